from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HeadsRequest(_message.Message):
    __slots__ = ("namespace", "keys", "head_bytes", "packed")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    HEAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    head_bytes: int
    packed: bool
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., head_bytes: _Optional[int] = ..., packed: _Optional[bool] = ...) -> None: ...

class Head(_message.Message):
    __slots__ = ("present", "unverified", "size", "checksum", "head", "deleted_ago", "committed_ago")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    UNVERIFIED_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    DELETED_AGO_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AGO_FIELD_NUMBER: _ClassVar[int]
    present: bool
    unverified: bool
    size: int
    checksum: int
    head: bytes
    deleted_ago: float
    committed_ago: float
    def __init__(self, present: _Optional[bool] = ..., unverified: _Optional[bool] = ..., size: _Optional[int] = ..., checksum: _Optional[int] = ..., head: _Optional[bytes] = ..., deleted_ago: _Optional[float] = ..., committed_ago: _Optional[float] = ...) -> None: ...

class HeadsResponse(_message.Message):
    __slots__ = ("heads", "unverified_objects", "epoch", "put_flags", "packed_heads")
    HEADS_FIELD_NUMBER: _ClassVar[int]
    UNVERIFIED_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PUT_FLAGS_FIELD_NUMBER: _ClassVar[int]
    PACKED_HEADS_FIELD_NUMBER: _ClassVar[int]
    heads: _containers.RepeatedCompositeFieldContainer[Head]
    unverified_objects: int
    epoch: int
    put_flags: int
    packed_heads: bytes
    def __init__(self, heads: _Optional[_Iterable[_Union[Head, _Mapping]]] = ..., unverified_objects: _Optional[int] = ..., epoch: _Optional[int] = ..., put_flags: _Optional[int] = ..., packed_heads: _Optional[bytes] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("cancel",)
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    cancel: bool
    def __init__(self, cancel: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("draining", "objects_left", "detail")
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_LEFT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    objects_left: int
    detail: str
    def __init__(self, draining: _Optional[bool] = ..., objects_left: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("namespace", "policy")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    policy: str
    def __init__(self, namespace: _Optional[str] = ..., policy: _Optional[str] = ...) -> None: ...

class SetPolicyResponse(_message.Message):
    __slots__ = ("policies",)
    class PoliciesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.ScalarMap[str, str]
    def __init__(self, policies: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RepairStatus(_message.Message):
    __slots__ = ("state", "passes", "scanned", "total", "records_written", "bytes_written", "verified", "dropped", "removed", "failures", "last_pass_seconds", "pending", "pass_seconds", "rate", "eta_seconds", "pace", "yield_seconds")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    SCANNED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    RECORDS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    LAST_PASS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    PASS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PACE_FIELD_NUMBER: _ClassVar[int]
    YIELD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    state: str
    passes: int
    scanned: int
    total: int
    records_written: int
    bytes_written: int
    verified: int
    dropped: int
    removed: int
    failures: int
    last_pass_seconds: float
    pending: int
    pass_seconds: float
    rate: float
    eta_seconds: float
    pace: float
    yield_seconds: float
    def __init__(self, state: _Optional[str] = ..., passes: _Optional[int] = ..., scanned: _Optional[int] = ..., total: _Optional[int] = ..., records_written: _Optional[int] = ..., bytes_written: _Optional[int] = ..., verified: _Optional[int] = ..., dropped: _Optional[int] = ..., removed: _Optional[int] = ..., failures: _Optional[int] = ..., last_pass_seconds: _Optional[float] = ..., pending: _Optional[int] = ..., pass_seconds: _Optional[float] = ..., rate: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., pace: _Optional[float] = ..., yield_seconds: _Optional[float] = ...) -> None: ...

class MembersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Member(_message.Message):
    __slots__ = ("node_id", "control_address", "data_address", "shm_socket", "dram_capacity_bytes", "nvme_capacity_bytes", "failure_domain", "version", "started_at", "health", "last_seen_seconds_ago", "self", "draining", "placement")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHM_SOCKET_FIELD_NUMBER: _ClassVar[int]
    DRAM_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NVME_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FAILURE_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_SECONDS_AGO_FIELD_NUMBER: _ClassVar[int]
    SELF_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    control_address: str
    data_address: str
    shm_socket: str
    dram_capacity_bytes: int
    nvme_capacity_bytes: int
    failure_domain: str
    version: str
    started_at: float
    health: str
    last_seen_seconds_ago: float
    self: bool
    draining: bool
    placement: bool
    def __init__(self_, node_id: _Optional[str] = ..., control_address: _Optional[str] = ..., data_address: _Optional[str] = ..., shm_socket: _Optional[str] = ..., dram_capacity_bytes: _Optional[int] = ..., nvme_capacity_bytes: _Optional[int] = ..., failure_domain: _Optional[str] = ..., version: _Optional[str] = ..., started_at: _Optional[float] = ..., health: _Optional[str] = ..., last_seen_seconds_ago: _Optional[float] = ..., self: _Optional[bool] = ..., draining: _Optional[bool] = ..., placement: _Optional[bool] = ...) -> None: ...

class MembersResponse(_message.Message):
    __slots__ = ("members", "source", "degraded", "cluster", "node_id", "detail", "epoch", "policies", "repair")
    class PoliciesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    REPAIR_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    source: str
    degraded: bool
    cluster: str
    node_id: str
    detail: str
    epoch: int
    policies: _containers.ScalarMap[str, str]
    repair: RepairStatus
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., source: _Optional[str] = ..., degraded: _Optional[bool] = ..., cluster: _Optional[str] = ..., node_id: _Optional[str] = ..., detail: _Optional[str] = ..., epoch: _Optional[int] = ..., policies: _Optional[_Mapping[str, str]] = ..., repair: _Optional[_Union[RepairStatus, _Mapping]] = ...) -> None: ...

class DeleteAllRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("changed",)
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    changed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, changed: _Optional[_Iterable[str]] = ...) -> None: ...

class KeysRequest(_message.Message):
    __slots__ = ("namespace", "keys")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class ExistsResponse(_message.Message):
    __slots__ = ("exists",)
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    exists: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, exists: _Optional[_Iterable[bool]] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("namespace", "keys", "ttl_seconds")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_seconds: float
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class CountResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("count", "deleted")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    count: int
    deleted: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, count: _Optional[int] = ..., deleted: _Optional[_Iterable[bool]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("namespace", "key", "value", "checksum", "overwrite")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    value: bytes
    checksum: int
    overwrite: bool
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., checksum: _Optional[int] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    def __init__(self, stored: _Optional[bool] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace", "key")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("value", "checksum")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    value: bytes
    checksum: int
    def __init__(self, value: _Optional[bytes] = ..., checksum: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "node_id", "data_host", "data_port", "wire_version", "checksum_algorithm", "max_value_size", "max_control_value_size", "max_key_length", "max_batch_keys", "shm_socket")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_HOST_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    WIRE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTROL_VALUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_KEY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_KEYS_FIELD_NUMBER: _ClassVar[int]
    SHM_SOCKET_FIELD_NUMBER: _ClassVar[int]
    version: str
    node_id: str
    data_host: str
    data_port: int
    wire_version: int
    checksum_algorithm: str
    max_value_size: int
    max_control_value_size: int
    max_key_length: int
    max_batch_keys: int
    shm_socket: str
    def __init__(self, version: _Optional[str] = ..., node_id: _Optional[str] = ..., data_host: _Optional[str] = ..., data_port: _Optional[int] = ..., wire_version: _Optional[int] = ..., checksum_algorithm: _Optional[str] = ..., max_value_size: _Optional[int] = ..., max_control_value_size: _Optional[int] = ..., max_key_length: _Optional[int] = ..., max_batch_keys: _Optional[int] = ..., shm_socket: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("live", "ready", "status", "uptime_seconds")
    LIVE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    live: bool
    ready: bool
    status: str
    uptime_seconds: float
    def __init__(self, live: _Optional[bool] = ..., ready: _Optional[bool] = ..., status: _Optional[str] = ..., uptime_seconds: _Optional[float] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "capacity_bytes", "used_bytes", "objects", "counters", "io_backend", "io_backend_reason")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    IO_BACKEND_FIELD_NUMBER: _ClassVar[int]
    IO_BACKEND_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    capacity_bytes: int
    used_bytes: int
    objects: int
    counters: _containers.ScalarMap[str, int]
    io_backend: str
    io_backend_reason: str
    def __init__(self, name: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., objects: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ..., io_backend: _Optional[str] = ..., io_backend_reason: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("counters", "namespaces", "tiers", "connections", "uptime_seconds")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class NamespacesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    counters: _containers.ScalarMap[str, int]
    namespaces: _containers.ScalarMap[str, int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    connections: int
    uptime_seconds: float
    def __init__(self, counters: _Optional[_Mapping[str, int]] = ..., namespaces: _Optional[_Mapping[str, int]] = ..., tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., connections: _Optional[int] = ..., uptime_seconds: _Optional[float] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("namespace", "limit")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    limit: int
    def __init__(self, namespace: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListEntry(_message.Message):
    __slots__ = ("namespace", "key", "size", "checksum", "pinned", "age_seconds", "tier")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    size: int
    checksum: int
    pinned: bool
    age_seconds: float
    tier: str
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., size: _Optional[int] = ..., checksum: _Optional[int] = ..., pinned: _Optional[bool] = ..., age_seconds: _Optional[float] = ..., tier: _Optional[str] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("entries", "total")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ListEntry]
    total: int
    def __init__(self, entries: _Optional[_Iterable[_Union[ListEntry, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...
