from edgellm.v1 import common_pb2 as _common_pb2
from edgellm.v1 import decode_pb2 as _decode_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("spec", "decode_address")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.RequestSpec
    decode_address: str
    def __init__(self, spec: _Optional[_Union[_common_pb2.RequestSpec, _Mapping]] = ..., decode_address: _Optional[str] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("request_id", "first_token_id", "num_prompt_tokens", "forward_start_unix_ns", "forward_end_unix_ns", "kv", "finish_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_START_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_END_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token_id: int
    num_prompt_tokens: int
    forward_start_unix_ns: int
    forward_end_unix_ns: int
    kv: _decode_pb2.KVAck
    finish_reason: _common_pb2.FinishReason
    def __init__(self, request_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., forward_start_unix_ns: _Optional[int] = ..., forward_end_unix_ns: _Optional[int] = ..., kv: _Optional[_Union[_decode_pb2.KVAck, _Mapping]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ...) -> None: ...

class ExtendBackupRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.RequestSpec
    def __init__(self, spec: _Optional[_Union[_common_pb2.RequestSpec, _Mapping]] = ...) -> None: ...

class ExtendBackupResponse(_message.Message):
    __slots__ = ("num_kept_tokens",)
    NUM_KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_kept_tokens: int
    def __init__(self, num_kept_tokens: _Optional[int] = ...) -> None: ...
