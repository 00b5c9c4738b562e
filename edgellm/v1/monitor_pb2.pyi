from edgellm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RouteMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_MODE_UNSPECIFIED: _ClassVar[RouteMode]
    ROUTE_MODE_NORMAL: _ClassVar[RouteMode]
    ROUTE_MODE_DEGRADED: _ClassVar[RouteMode]
    ROUTE_MODE_COLOCATED: _ClassVar[RouteMode]
    ROUTE_MODE_NO_PREFILL: _ClassVar[RouteMode]
ROUTE_MODE_UNSPECIFIED: RouteMode
ROUTE_MODE_NORMAL: RouteMode
ROUTE_MODE_DEGRADED: RouteMode
ROUTE_MODE_COLOCATED: RouteMode
ROUTE_MODE_NO_PREFILL: RouteMode

class ServiceState(_message.Message):
    __slots__ = ("address", "role", "healthy", "consecutive_failures", "last_change_unix_ms", "load")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LAST_CHANGE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    address: str
    role: _common_pb2.ServiceRole
    healthy: bool
    consecutive_failures: int
    last_change_unix_ms: int
    load: _common_pb2.Load
    def __init__(self, address: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.ServiceRole, str]] = ..., healthy: _Optional[bool] = ..., consecutive_failures: _Optional[int] = ..., last_change_unix_ms: _Optional[int] = ..., load: _Optional[_Union[_common_pb2.Load, _Mapping]] = ...) -> None: ...

class RouteTable(_message.Message):
    __slots__ = ("version", "mode", "prefill_addresses", "decode_addresses", "services")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    version: int
    mode: RouteMode
    prefill_addresses: _containers.RepeatedScalarFieldContainer[str]
    decode_addresses: _containers.RepeatedScalarFieldContainer[str]
    services: _containers.RepeatedCompositeFieldContainer[ServiceState]
    def __init__(self, version: _Optional[int] = ..., mode: _Optional[_Union[RouteMode, str]] = ..., prefill_addresses: _Optional[_Iterable[str]] = ..., decode_addresses: _Optional[_Iterable[str]] = ..., services: _Optional[_Iterable[_Union[ServiceState, _Mapping]]] = ...) -> None: ...

class WatchRoutesRequest(_message.Message):
    __slots__ = ("watcher",)
    WATCHER_FIELD_NUMBER: _ClassVar[int]
    watcher: str
    def __init__(self, watcher: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
