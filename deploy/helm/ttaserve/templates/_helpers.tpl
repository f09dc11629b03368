{{/* Names and labels. */}}
{{- define "ttaserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ttaserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ttaserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ttaserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ttaserve.labels" -}}
{{ include "ttaserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Where things live in the container. */}}
{{- define "ttaserve.repositoryPath" -}}/var/lib/ttaserve/models{{- end -}}
{{- define "ttaserve.snapshotPath" -}}/var/lib/ttaserve/snapshots{{- end -}}
{{- define "ttaserve.tlsPath" -}}/etc/ttaserve-tls{{- end -}}
{{- define "ttaserve.clientCaPath" -}}/etc/ttaserve-client-ca{{- end -}}

{{/* Whether the pod assembles a model repository (else the embedded default model is served). */}}
{{- define "ttaserve.hasRepository" -}}
{{- if or .Values.modelRepository.existingClaim .Values.models -}}true{{- end -}}
{{- end -}}

{{/* settings.yaml: the user's ServerSettings plus what the chart decides. */}}
{{- define "ttaserve.settings" -}}
{{- $settings := deepCopy .Values.settings -}}
{{- $_ := set $settings "grpc_host" "0.0.0.0" -}}
{{- $_ := set $settings "grpc_port" (int .Values.service.grpcPort) -}}
{{- $_ := set $settings "http_port" (int .Values.service.httpPort) -}}
{{- $_ := set $settings "metrics_port" (int .Values.service.metricsPort) -}}
{{- $_ := set $settings "snapshot_dir" (include "ttaserve.snapshotPath" .) -}}
{{- if include "ttaserve.hasRepository" . -}}
{{- $_ := set $settings "model_repository" (include "ttaserve.repositoryPath" .) -}}
{{- end -}}
{{- if .Values.tls.secretName -}}
{{- $_ := set $settings "tls_cert" (printf "%s/tls.crt" (include "ttaserve.tlsPath" .)) -}}
{{- $_ := set $settings "tls_key" (printf "%s/tls.key" (include "ttaserve.tlsPath" .)) -}}
{{- if .Values.tls.clientCaSecretName -}}
{{- $_ := set $settings "tls_client_ca" (printf "%s/ca.crt" (include "ttaserve.clientCaPath" .)) -}}
{{- end -}}
{{- else if .Values.tls.clientCaSecretName -}}
{{- fail "tls.clientCaSecretName needs tls.secretName: mutual TLS is TLS first" -}}
{{- end -}}
{{- toYaml $settings -}}
{{- end -}}

{{- define "ttaserve.terminationGracePeriodSeconds" -}}
{{- add (ceil .Values.settings.drain_timeout_s | int) .Values.terminationGraceExtraSeconds -}}
{{- end -}}

{{/* The three probes: gRPC health checks in plaintext; HTTP GETs of the metrics port with TLS on. */}}
{{- define "ttaserve.probe" -}}
{{- if .root.Values.tls.secretName -}}
httpGet: {path: {{ ternary "/v2/health/ready" "/v2/health/live" (eq .kind "readiness") }}, port: metrics}
{{- else if eq .kind "readiness" -}}
grpc: {port: {{ .root.Values.service.grpcPort }}}
{{- else -}}
grpc: {port: {{ .root.Values.service.grpcPort }}, service: liveness}
{{- end -}}
{{- end -}}
