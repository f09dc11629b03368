from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StrategyInfo(_message.Message):
    __slots__ = ("name", "description", "config_schema_json", "defaults_json", "stateful", "uses_gradients", "requires")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_JSON_FIELD_NUMBER: _ClassVar[int]
    STATEFUL_FIELD_NUMBER: _ClassVar[int]
    USES_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    config_schema_json: str
    defaults_json: str
    stateful: bool
    uses_gradients: bool
    requires: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., config_schema_json: _Optional[str] = ..., defaults_json: _Optional[str] = ..., stateful: bool = ..., uses_gradients: bool = ..., requires: _Optional[_Iterable[str]] = ...) -> None: ...

class ListStrategiesRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class ListStrategiesResponse(_message.Message):
    __slots__ = ("strategies",)
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    strategies: _containers.RepeatedCompositeFieldContainer[StrategyInfo]
    def __init__(self, strategies: _Optional[_Iterable[_Union[StrategyInfo, _Mapping]]] = ...) -> None: ...

class SessionKey(_message.Message):
    __slots__ = ("caller", "model_name", "strategy", "sequence_id")
    CALLER_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    caller: str
    model_name: str
    strategy: str
    sequence_id: str
    def __init__(self, caller: _Optional[str] = ..., model_name: _Optional[str] = ..., strategy: _Optional[str] = ..., sequence_id: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("key", "steps", "state_bytes", "last_stats", "settings_json", "created_unix", "last_used_unix", "resets", "model_version", "spilled")
    class LastStatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_STATS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_FIELD_NUMBER: _ClassVar[int]
    RESETS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPILLED_FIELD_NUMBER: _ClassVar[int]
    key: SessionKey
    steps: int
    state_bytes: int
    last_stats: _containers.ScalarMap[str, float]
    settings_json: str
    created_unix: float
    last_used_unix: float
    resets: int
    model_version: str
    spilled: bool
    def __init__(self, key: _Optional[_Union[SessionKey, _Mapping]] = ..., steps: _Optional[int] = ..., state_bytes: _Optional[int] = ..., last_stats: _Optional[_Mapping[str, float]] = ..., settings_json: _Optional[str] = ..., created_unix: _Optional[float] = ..., last_used_unix: _Optional[float] = ..., resets: _Optional[int] = ..., model_version: _Optional[str] = ..., spilled: bool = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("model_name", "all_callers")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ALL_CALLERS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    all_callers: bool
    def __init__(self, model_name: _Optional[str] = ..., all_callers: bool = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: SessionKey
    def __init__(self, key: _Optional[_Union[SessionKey, _Mapping]] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class ResetSessionRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: SessionKey
    def __init__(self, key: _Optional[_Union[SessionKey, _Mapping]] = ...) -> None: ...

class ResetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: SessionKey
    def __init__(self, key: _Optional[_Union[SessionKey, _Mapping]] = ...) -> None: ...

class EndSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotSessionRequest(_message.Message):
    __slots__ = ("key", "return_data")
    KEY_FIELD_NUMBER: _ClassVar[int]
    RETURN_DATA_FIELD_NUMBER: _ClassVar[int]
    key: SessionKey
    return_data: bool
    def __init__(self, key: _Optional[_Union[SessionKey, _Mapping]] = ..., return_data: bool = ...) -> None: ...

class SnapshotSessionResponse(_message.Message):
    __slots__ = ("path", "byte_size", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    byte_size: int
    data: bytes
    def __init__(self, path: _Optional[str] = ..., byte_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RestoreSessionRequest(_message.Message):
    __slots__ = ("key", "data")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    key: SessionKey
    data: bytes
    def __init__(self, key: _Optional[_Union[SessionKey, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RestoreSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...
