"""The Compute contract, checked with the real globus-compute-sdk (scripts/compute-contract.sh).

  results DIR   writes task results as an endpoint serializes them (DillDataBase64 `00`,
                JSONData `11`, AllDataStrategies `13`) with the value each must decode to
  payloads DIR  reads the task payloads and submit bodies the gateway sent (written by
                tests/compute_contract.rs) and checks them with the SDK's ComputeSerializer
"""

import importlib
import json
import pathlib
import sys

from globus_compute_sdk.sdk.batch import Batch
from globus_compute_sdk.serialize import ComputeSerializer
from globus_compute_sdk.serialize.base import SerializationStrategy
from globus_compute_sdk.serialize.concretes import AllDataStrategies, DillDataBase64, JSONData

COMPLETION = {
    "id": "chatcmpl-1", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    "response_time": 0.25, "throughput_tokens_per_second": 16.0,
}
VALUES = {
    "dict": COMPLETION,
    # FIRST's inference function returns json.dumps(...): a string holding JSON.
    "json_string": json.dumps(COMPLETION, indent=4),
    "big_string": "x" * (2 * 1024 * 1024),
    "unicode": "Grüße, 東京, emoji 😀, nul-free \u2028 line sep",
    "nested": {"a": [1, 2.5, None, True, False, {"b": "ü"}], "n": -12345678901},
}
STRATEGIES = {"00": DillDataBase64(), "11": JSONData(), "13": AllDataStrategies()}


def deserialize_task(serde: ComputeSerializer, payload: str) -> list:
    buffers = serde.unpack_buffers(payload)
    if len(buffers) != 2:
        fail(f"a task payload has 2 buffers (args, kwargs), not {len(buffers)}")
    return [serde.deserialize(b) for b in buffers]


def results(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, value in VALUES.items():
        (out / f"{name}.json").write_text(json.dumps(value))
        for header, strategy in STRATEGIES.items():
            text = ComputeSerializer(strategy_data=strategy).serialize(value)
            assert text.startswith(header + "\n"), (name, header, text[:10])
            (out / f"{name}.{header}.txt").write_text(text)
    print(f"compute-contract: {len(VALUES) * len(STRATEGIES)} results written to {out}")


def fail(what: str) -> None:
    print(f"compute-contract: FAILED: {what}", file=sys.stderr)
    sys.exit(1)


def payloads(src: pathlib.Path) -> None:
    serde = ComputeSerializer()
    checked = 0
    for path in sorted(src.glob("*.payload")):
        # The endpoint's worker unpacks [function, args, kwargs] (the service prepends the
        # function's buffer): args and kwargs, each deserialized by its own header.
        args, kwargs = deserialize_task(serde, path.read_text())
        if not isinstance(args, (list, tuple)) or kwargs != {}:
            fail(f"{path.name}: args must be a list and kwargs empty, got {args!r}, {kwargs!r}")
        params = args[0]["model_params"]
        kind = path.stem.split(".")[0]
        if kind in ("inference", "stream"):
            # What FIRST's vllm_inference_function pops and reads.
            if not isinstance(params.get("openai_endpoint"), str):
                fail(f"{path.name}: model_params.openai_endpoint missing")
            if not isinstance(params.get("api_port"), int):
                fail(f"{path.name}: model_params.api_port must be an int")
            if not isinstance(params.get("model"), str):
                fail(f"{path.name}: model_params.model missing")
        if kind == "stream":
            for k in ("streaming_server_host", "streaming_server_port", "stream_task_id",
                      "stream_task_token"):
                if not params.get(k):
                    fail(f"{path.name}: a stream needs model_params.{k}")
            if params.get("stream") is not True:
                fail(f"{path.name}: a relayed stream has stream: true")
        if kind == "batch":
            # What FIRST's submit_batch sends its batch function.
            if set(args[0]) != {"model_params", "batch_id", "username"}:
                fail(f"{path.name}: batch argument keys {sorted(args[0])}")
            if not {"input_file", "model"} <= set(params):
                fail(f"{path.name}: batch model_params {sorted(params)}")
        checked += 1
    for path in sorted(src.glob("*.body.json")):
        body = json.loads(path.read_text())
        batch = Batch(task_group_id=body.get("task_group_id"),
                      result_serializers=body.get("result_serializers"))
        expected = set(batch.prepare())
        if set(body) != expected:
            fail(f"{path.name}: submit keys {sorted(body)}, Batch.prepare() has {sorted(expected)}")
        for strategy in body.get("result_serializers", []):
            module, _, cls = strategy.rpartition(".")
            if not issubclass(getattr(importlib.import_module(module), cls), SerializationStrategy):
                fail(f"{path.name}: {strategy} is not a serialization strategy")
        for payloads in body["tasks"].values():
            for p in payloads:
                deserialize_task(serde, p)
        checked += 1
    if checked < 4:
        fail(f"only {checked} payloads and bodies found in {src}")
    print(f"compute-contract: {checked} payloads and submit bodies pass the SDK's checks")


if __name__ == "__main__":
    {"results": results, "payloads": payloads}[sys.argv[1]](pathlib.Path(sys.argv[2]))
