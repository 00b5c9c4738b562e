from edgellm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_DTYPE_UNSPECIFIED: _ClassVar[KVDtype]
    KV_DTYPE_FP32: _ClassVar[KVDtype]
    KV_DTYPE_FP16: _ClassVar[KVDtype]
    KV_DTYPE_BF16: _ClassVar[KVDtype]
    KV_DTYPE_INT8: _ClassVar[KVDtype]
KV_DTYPE_UNSPECIFIED: KVDtype
KV_DTYPE_FP32: KVDtype
KV_DTYPE_FP16: KVDtype
KV_DTYPE_BF16: KVDtype
KV_DTYPE_INT8: KVDtype

class KVChunk(_message.Message):
    __slots__ = ("request_id", "seq_no", "layer_start", "layer_end", "token_start", "token_end", "dtype", "shape", "k", "v", "crc32", "is_last", "num_chunks", "num_prompt_tokens", "first_token_id", "k_scales", "v_scales", "k_channel_scales", "v_channel_scales", "prompt_digest", "head_start", "head_end", "head_shard")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_NO_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    K_SCALES_FIELD_NUMBER: _ClassVar[int]
    V_SCALES_FIELD_NUMBER: _ClassVar[int]
    K_CHANNEL_SCALES_FIELD_NUMBER: _ClassVar[int]
    V_CHANNEL_SCALES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_FIELD_NUMBER: _ClassVar[int]
    HEAD_END_FIELD_NUMBER: _ClassVar[int]
    HEAD_SHARD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    seq_no: int
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    dtype: KVDtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    k: bytes
    v: bytes
    crc32: int
    is_last: bool
    num_chunks: int
    num_prompt_tokens: int
    first_token_id: int
    k_scales: bytes
    v_scales: bytes
    k_channel_scales: bytes
    v_channel_scales: bytes
    prompt_digest: bytes
    head_start: int
    head_end: int
    head_shard: bool
    def __init__(self, request_id: _Optional[str] = ..., seq_no: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., dtype: _Optional[_Union[KVDtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., k: _Optional[bytes] = ..., v: _Optional[bytes] = ..., crc32: _Optional[int] = ..., is_last: _Optional[bool] = ..., num_chunks: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., first_token_id: _Optional[int] = ..., k_scales: _Optional[bytes] = ..., v_scales: _Optional[bytes] = ..., k_channel_scales: _Optional[bytes] = ..., v_channel_scales: _Optional[bytes] = ..., prompt_digest: _Optional[bytes] = ..., head_start: _Optional[int] = ..., head_end: _Optional[int] = ..., head_shard: _Optional[bool] = ...) -> None: ...

class KVAck(_message.Message):
    __slots__ = ("request_id", "num_chunks", "num_bytes", "first_chunk_received_unix_ns", "last_chunk_received_unix_ns")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_RECEIVED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    LAST_CHUNK_RECEIVED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_chunks: int
    num_bytes: int
    first_chunk_received_unix_ns: int
    last_chunk_received_unix_ns: int
    def __init__(self, request_id: _Optional[str] = ..., num_chunks: _Optional[int] = ..., num_bytes: _Optional[int] = ..., first_chunk_received_unix_ns: _Optional[int] = ..., last_chunk_received_unix_ns: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.RequestSpec
    def __init__(self, spec: _Optional[_Union[_common_pb2.RequestSpec, _Mapping]] = ...) -> None: ...
