"""Property-based fuzzing (hypothesis) of the parsers that take outside input: the
server's request parser, the image loader, the torch pickle reader and the
finetune JSONL reader. Each either succeeds or raises its one documented error
type with a message; nothing else escapes. Bounded (60 examples each, derandomized)
so the default tier stays fast."""

import io
import json
import zipfile

import pytest

import hypothesis  # noqa: E402 - in the test extras
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# no deadline: the machine is shared, and a timing is not what these tests check
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
fields = st.sampled_from(["messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
                          "stream", "stream_options", "n", "repetition_penalty", "model"])
requests = st.dictionaries(fields, json_values, max_size=6) | st.fixed_dictionaries({
    "messages": st.lists(st.fixed_dictionaries({"role": json_values, "content": json_values}), max_size=3),
})


@FAST
@given(body=st.one_of(requests.map(lambda r: json.dumps(r).encode()), st.binary(max_size=200)))
def test_the_request_parser_answers_api_errors_only(body):
    from mlx_vlm_native.server import APIError, chat_messages, parse_json_body, sampling_options, stream_settings

    try:
        request = parse_json_body(body)
        chat_messages(request)
        sampling_options(request, 16)
        stream_settings(request)
    except APIError as e:
        assert 400 <= e.status < 500 and e.message


def png(size, mode) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


@FAST
@given(data=st.one_of(
    st.binary(max_size=300),
    st.tuples(st.sampled_from(["RGB", "L", "LA", "RGBA", "P", "I;16", "1"]),
              st.integers(1, 40), st.integers(1, 40), st.integers(0, 200), st.binary(max_size=8))
    .map(lambda t: bytearray(png((t[1], t[2]), t[0]))[: len(png((t[1], t[2]), t[0])) - t[3]] + t[4]),
))
def test_the_image_loader_decodes_or_refuses(data):
    from mlx_vlm_native.processors.image import ImageError, load_image

    try:
        image = load_image(bytes(data), max_pixels=10_000)
    except ImageError as e:
        assert str(e)
    else:
        assert image.mode == "RGB" and image.size[0] * image.size[1] <= 10_000


def torch_zip(pickle_bytes: bytes, storages: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
    return buffer.getvalue()


def tensor_record(size, stride, offset, numel):
    """A hand-made protocol-2 pickle of {'w': a FloatStorage tensor}."""
    def ints(values):
        return b"(" + b"".join(b"J" + int(v).to_bytes(4, "little", signed=True) for v in values) + b"t"

    return (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
            b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ"
            + int(numel).to_bytes(4, "little", signed=True) + b"tQJ" + int(offset).to_bytes(4, "little", signed=True)
            + ints(size) + ints(stride) + b"\x89ccollections\nOrderedDict\n)RtRs.")


dims = st.integers(-2, 100_000)


@FAST
@given(case=st.one_of(
    st.tuples(st.lists(dims, max_size=3), st.lists(dims, max_size=3), st.integers(-2, 10), st.integers(0, 64),
              st.integers(0, 64)).map(lambda t: torch_zip(tensor_record(t[0], t[1], t[2], t[3]), {"0": bytes(4 * t[4])})),
    st.binary(max_size=200).map(lambda b: torch_zip(b"\x80\x02" + b, {})),
    st.binary(max_size=300),
))
def test_the_pickle_reader_reads_or_refuses(tmp_path_factory, case):
    from mlx_vlm_native.weights.torch_pickle import load_torch_checkpoint

    path = tmp_path_factory.mktemp("fuzz") / "w.bin"
    path.write_bytes(case)
    try:
        weights = load_torch_checkpoint(path)
    except ValueError as e:  # UnsafePickleError is one
        assert str(e)
    else:
        assert all(v.nbytes <= 64 << 20 for v in weights.values())  # never more than the slack allows


roles = st.sampled_from(["user", "assistant", "system", "human", "gpt", "robot", 3, None])
turns = st.lists(st.fixed_dictionaries({"from": roles, "value": json_values}), max_size=4)
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": json_values}), max_size=4)
records = st.one_of(st.fixed_dictionaries({"conversations": turns}), st.fixed_dictionaries({"messages": messages}),
                    json_values)


@FAST
@given(lines=st.lists(st.one_of(records.map(lambda r: json.dumps(r).encode()), st.binary(max_size=60)),
                      min_size=1, max_size=5))
def test_the_jsonl_reader_checks_every_line(tmp_path_factory, lines):
    from mlx_vlm_native.training.finetune import ConversationFile, RecordError

    path = tmp_path_factory.mktemp("jsonl") / "d.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    try:
        data = ConversationFile(path)
    except RecordError as e:
        assert f"{path}, line " in str(e)
    except ValueError as e:
        assert "no usable records" in str(e)
    else:
        for i in range(len(data)):  # what passed the check reads back
            assert data.read(i).messages
