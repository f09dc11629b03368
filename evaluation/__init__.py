"""Evaluation harness: the field's test-time adaptation protocols on real data, in-process or through the server."""
