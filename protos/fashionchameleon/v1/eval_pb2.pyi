import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunBenchmarkRequest(_message.Message):
    __slots__ = ("manifest_key", "smoke", "run_id", "label", "max_samples", "metric_groups", "judge_repeats")
    MANIFEST_KEY_FIELD_NUMBER: _ClassVar[int]
    SMOKE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRIC_GROUPS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_REPEATS_FIELD_NUMBER: _ClassVar[int]
    manifest_key: str
    smoke: bool
    run_id: str
    label: str
    max_samples: int
    metric_groups: _containers.RepeatedScalarFieldContainer[str]
    judge_repeats: int
    def __init__(self, manifest_key: _Optional[str] = ..., smoke: _Optional[bool] = ..., run_id: _Optional[str] = ..., label: _Optional[str] = ..., max_samples: _Optional[int] = ..., metric_groups: _Optional[_Iterable[str]] = ..., judge_repeats: _Optional[int] = ...) -> None: ...

class GetReportRequest(_message.Message):
    __slots__ = ("run_id", "include_html")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HTML_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    include_html: bool
    def __init__(self, run_id: _Optional[str] = ..., include_html: _Optional[bool] = ...) -> None: ...

class EvalRun(_message.Message):
    __slots__ = ("run_id", "state", "samples_total", "samples_done", "samples_failed", "error_message", "started_at", "finished_at", "benchmark", "benchmark_sha256")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[EvalRun.State]
        RUNNING: _ClassVar[EvalRun.State]
        DONE: _ClassVar[EvalRun.State]
        FAILED: _ClassVar[EvalRun.State]
    STATE_UNSPECIFIED: EvalRun.State
    RUNNING: EvalRun.State
    DONE: EvalRun.State
    FAILED: EvalRun.State
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_DONE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FAILED_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_SHA256_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: EvalRun.State
    samples_total: int
    samples_done: int
    samples_failed: int
    error_message: str
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    benchmark: str
    benchmark_sha256: str
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[EvalRun.State, str]] = ..., samples_total: _Optional[int] = ..., samples_done: _Optional[int] = ..., samples_failed: _Optional[int] = ..., error_message: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., benchmark: _Optional[str] = ..., benchmark_sha256: _Optional[str] = ...) -> None: ...

class MetricSummary(_message.Message):
    __slots__ = ("key", "title", "has_value", "value", "aggregate", "unit", "n", "n_missing", "n_unavailable", "n_error", "status", "models", "reasons", "higher_is_better")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    HAS_VALUE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    N_MISSING_FIELD_NUMBER: _ClassVar[int]
    N_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    N_ERROR_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    HIGHER_IS_BETTER_FIELD_NUMBER: _ClassVar[int]
    key: str
    title: str
    has_value: bool
    value: float
    aggregate: str
    unit: str
    n: int
    n_missing: int
    n_unavailable: int
    n_error: int
    status: str
    models: _containers.RepeatedScalarFieldContainer[str]
    reasons: _containers.RepeatedScalarFieldContainer[str]
    higher_is_better: bool
    def __init__(self, key: _Optional[str] = ..., title: _Optional[str] = ..., has_value: _Optional[bool] = ..., value: _Optional[float] = ..., aggregate: _Optional[str] = ..., unit: _Optional[str] = ..., n: _Optional[int] = ..., n_missing: _Optional[int] = ..., n_unavailable: _Optional[int] = ..., n_error: _Optional[int] = ..., status: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., reasons: _Optional[_Iterable[str]] = ..., higher_is_better: _Optional[bool] = ...) -> None: ...

class EvalReport(_message.Message):
    __slots__ = ("run", "metrics", "report_json", "json_key", "markdown_key", "html_key", "html")
    RUN_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    JSON_KEY_FIELD_NUMBER: _ClassVar[int]
    MARKDOWN_KEY_FIELD_NUMBER: _ClassVar[int]
    HTML_KEY_FIELD_NUMBER: _ClassVar[int]
    HTML_FIELD_NUMBER: _ClassVar[int]
    run: EvalRun
    metrics: _containers.RepeatedCompositeFieldContainer[MetricSummary]
    report_json: str
    json_key: str
    markdown_key: str
    html_key: str
    html: str
    def __init__(self, run: _Optional[_Union[EvalRun, _Mapping]] = ..., metrics: _Optional[_Iterable[_Union[MetricSummary, _Mapping]]] = ..., report_json: _Optional[str] = ..., json_key: _Optional[str] = ..., markdown_key: _Optional[str] = ..., html_key: _Optional[str] = ..., html: _Optional[str] = ...) -> None: ...
