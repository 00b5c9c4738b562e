from edgellm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StageTensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StageKVLoad(_message.Message):
    __slots__ = ("request_id", "slots")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., slots: _Optional[_Iterable[int]] = ...) -> None: ...

class StageStep(_message.Message):
    __slots__ = ("step_id", "is_prefill", "positions", "cu_seqlens", "slot_mapping", "store_rows", "block_tables", "max_blocks", "context_lens", "max_context_len", "hidden", "kv_loads")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    IS_PREFILL_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CU_SEQLENS_FIELD_NUMBER: _ClassVar[int]
    SLOT_MAPPING_FIELD_NUMBER: _ClassVar[int]
    STORE_ROWS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLES_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_LEN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    KV_LOADS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    is_prefill: bool
    positions: _containers.RepeatedScalarFieldContainer[int]
    cu_seqlens: _containers.RepeatedScalarFieldContainer[int]
    slot_mapping: _containers.RepeatedScalarFieldContainer[int]
    store_rows: _containers.RepeatedScalarFieldContainer[int]
    block_tables: _containers.RepeatedScalarFieldContainer[int]
    max_blocks: int
    context_lens: _containers.RepeatedScalarFieldContainer[int]
    max_context_len: int
    hidden: StageTensor
    kv_loads: _containers.RepeatedCompositeFieldContainer[StageKVLoad]
    def __init__(self, step_id: _Optional[int] = ..., is_prefill: _Optional[bool] = ..., positions: _Optional[_Iterable[int]] = ..., cu_seqlens: _Optional[_Iterable[int]] = ..., slot_mapping: _Optional[_Iterable[int]] = ..., store_rows: _Optional[_Iterable[int]] = ..., block_tables: _Optional[_Iterable[int]] = ..., max_blocks: _Optional[int] = ..., context_lens: _Optional[_Iterable[int]] = ..., max_context_len: _Optional[int] = ..., hidden: _Optional[_Union[StageTensor, _Mapping]] = ..., kv_loads: _Optional[_Iterable[_Union[StageKVLoad, _Mapping]]] = ...) -> None: ...

class StageResult(_message.Message):
    __slots__ = ("hidden",)
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    hidden: StageTensor
    def __init__(self, hidden: _Optional[_Union[StageTensor, _Mapping]] = ...) -> None: ...

class ClaimStageKVRequest(_message.Message):
    __slots__ = ("request_id", "wait_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    wait_s: float
    def __init__(self, request_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class ClaimStageKVReply(_message.Message):
    __slots__ = ("request_id", "num_prompt_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_prompt_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ...) -> None: ...

class DescribeStageRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetStageRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetStageReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
