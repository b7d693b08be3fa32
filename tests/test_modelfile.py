"""modelfile.check: every kind of damage to a saved version is named in one line, an intact
version passes, and the ONNX reader agrees with the onnx package on real model files."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import smocsd, write_config
from onnx import TensorProto, helper, numpy_helper

from smocsd import modelfile
from smocsd.data import demo

BACKENDS = ("ort", "numpy")
CHECKPOINT = {"ort": "checkpoint", "numpy": "weights.npz"}
DELETE = object()  # test_unusable_numbers_in_metadata: the key is removed


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Backend -> the version directory of one small model it trained (once per module).

    Trained through the CLI, the interface least likely to move under these tests."""
    versions = {}
    for backend in BACKENDS:
        root = tmp_path_factory.mktemp(backend)
        demo.write(root / "state/readings.db", 3000)
        cfg = write_config(root / "smocsd.toml", root / "state", training={"backend": backend})
        smocsd("train-once", config=cfg, check=True)
        versions[backend] = root / "state/models/autoencoder/v000001"
        assert (versions[backend] / "metadata.json").is_file()
    return versions


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def version(trained: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the numpy backend's version, free to damage."""
    return shutil.copytree(trained["numpy"], tmp_path / "v000001")


def meta_of(d: Path) -> dict:
    return json.loads((d / "metadata.json").read_text())


def write_meta(d: Path, meta: dict) -> None:
    (d / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")


def rehash(d: Path) -> None:
    """Makes metadata.json's sizes and hashes fit the files as they are now, so that only
    the content checks can find what was planted."""
    meta = meta_of(d)
    for name in meta["files"]:
        data = (d / name).read_bytes()
        meta["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    write_meta(d, meta)


def plant_weight(d: Path, tensor: str, index: int, value: float) -> None:
    """Sets one weight of model.onnx to `value`, metadata rehashed."""
    model = onnx.load(d / "model.onnx")
    for init in model.graph.initializer:
        if init.name == tensor:
            w = numpy_helper.to_array(init).copy()
            w.flat[index] = value
            init.CopyFrom(numpy_helper.from_array(w, tensor))
    onnx.save(model, d / "model.onnx")
    rehash(d)


def test_an_intact_version_passes(trained, backend, tmp_path):
    d = shutil.copytree(trained[backend], tmp_path / "v000001")
    (d / "notes.txt").write_text("not listed in metadata.json, and that is fine\n")
    assert modelfile.check(d) is None
    assert modelfile.check(trained[backend]) is None  # the store's own copy, untouched
    assert modelfile.check(trained[backend].parent / "current") is None


def test_reader_agrees_with_onnx_on_a_trained_model(trained, backend):
    """Both backends' real model.onnx, read without onnx, give what onnx.numpy_helper gives."""
    data = (trained[backend] / "model.onnx").read_bytes()
    ours = modelfile._initializers(data)
    theirs = onnx.load_from_string(data).graph.initializer
    assert [t.name for t in ours] == [t.name for t in theirs]
    assert [t.name for t in ours] == [
        f"layer{i // 2}.{('weight', 'bias')[i % 2]}" for i in range(8)
    ]
    for mine, init in zip(ours, theirs, strict=True):
        expected = numpy_helper.to_array(init)
        assert mine.data_type == init.data_type == TensorProto.FLOAT
        assert mine.dims == list(init.dims) == list(expected.shape)
        assert not mine.external
        assert np.array_equal(np.asarray(mine.values, np.float32).reshape(expected.shape), expected)


def tensor_model(*tensors: TensorProto) -> bytes:
    graph = helper.make_graph([], "g", [], [], list(tensors))
    return helper.make_model(graph).SerializeToString()


def test_reader_agrees_with_onnx_on_every_float_encoding():
    """float_data, double_data, float16 in int32_data or raw_data, float32 raw_data, and an
    integer tensor (not decoded): the encodings onnx may use, though we write only one."""
    rng = np.random.default_rng(0)
    arrays = {
        "f_typed": rng.standard_normal((3, 4)).astype(np.float32),
        "d_typed": rng.standard_normal(5),
        "h_typed": rng.standard_normal(6).astype(np.float16),
        "scalar": np.array(2.5, np.float32),
    }
    tensors = [
        helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape, a.flatten())
        for name, a in arrays.items()
    ]
    tensors += [
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float16), "h_raw"),
        numpy_helper.from_array(rng.standard_normal(4), "d_raw"),
        numpy_helper.from_array(np.arange(3, dtype=np.int64), "ints"),
    ]
    assert not any(t.raw_data for t in tensors[:4])  # really the typed fields
    data = tensor_model(*tensors)
    ours = {t.name: t for t in modelfile._initializers(data)}
    for init in onnx.load_from_string(data).graph.initializer:
        expected = numpy_helper.to_array(init)
        mine = ours[init.name]
        assert mine.data_type == init.data_type and mine.dims == list(expected.shape)
        if init.name == "ints":
            assert mine.values is None
        else:
            assert np.array_equal(
                np.asarray(mine.values, expected.dtype).reshape(expected.shape), expected
            )


def test_unpacked_float_data_is_read_too():
    """protobuf writers may emit a repeated float one field per value (wire type 5)."""
    name = b"w"
    tensor = (
        b"\x08\x02"  # dims: 2
        + b"\x10\x01"  # data_type: FLOAT
        + b"\x25" + struct.pack("<f", 1.5)
        + b"\x25" + struct.pack("<f", math.inf)
        + b"\x42" + bytes([len(name)]) + name
    )  # fmt: skip
    graph = b"\x2a" + bytes([len(tensor)]) + tensor
    data = b"\x3a" + bytes([len(graph)]) + graph
    expected = numpy_helper.to_array(onnx.load_from_string(data).graph.initializer[0])
    (mine,) = modelfile._initializers(data)
    assert mine.name == "w" and list(mine.values) == expected.tolist() == [1.5, math.inf]


def test_truncated_model_onnx(version):
    data = (version / "model.onnx").read_bytes()
    (version / "model.onnx").write_bytes(data[: len(data) // 2])
    assert modelfile.check(version) == (
        f"v000001/model.onnx: {len(data) // 2} bytes, metadata.json says {len(data)} "
        "(truncated or damaged)"
    )


def test_one_flipped_byte(version):
    data = bytearray((version / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (version / "model.onnx").write_bytes(data)
    assert modelfile.check(version) == (
        "v000001/model.onnx: sha256 does not match metadata.json (file damaged)"
    )


@pytest.mark.parametrize(
    ("value", "shown"), [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")]
)
def test_non_finite_weight_behind_a_matching_hash(version, value, shown):
    """A model trained into NaN hashes fine: only reading the weights finds it."""
    plant_weight(version, "layer2.weight", 5, value)
    assert modelfile.check(version) == (
        "v000001/model.onnx: initializer layer2.weight has a non-finite weight "
        f"({shown} at index 5)"
    )


def test_non_finite_bias_in_the_last_layer(version):
    plant_weight(version, "layer3.bias", 29, math.nan)
    assert "initializer layer3.bias has a non-finite weight (nan at index 29)" in str(
        modelfile.check(version)
    )


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00" * 64,
        b"this is not protobuf at all",
        b"\x3a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # an 11-byte varint
        b"\x08\x08\x12\x06smocsd",  # parses, but has no graph
    ],
)
def test_garbage_model_onnx_behind_a_matching_hash(version, content):
    (version / "model.onnx").write_bytes(content)
    rehash(version)
    assert modelfile.check(version).startswith("v000001/model.onnx: not a valid ONNX model (")


def test_truncated_model_onnx_behind_a_matching_hash(version):
    """Cut anywhere, the wire format no longer parses (or loses a graph's tensor bytes)."""
    data = (version / "model.onnx").read_bytes()
    for cut in (1, 7, len(data) // 3, len(data) // 2, len(data) - 1):
        (version / "model.onnx").write_bytes(data[:cut])
        rehash(version)
        problem = modelfile.check(version)
        assert problem is not None and problem.startswith("v000001/model.onnx: "), (cut, problem)


def test_a_model_without_initializers(version):
    model = onnx.load(version / "model.onnx")
    del model.graph.initializer[:]
    onnx.save(model, version / "model.onnx")
    rehash(version)
    assert modelfile.check(version) == (
        "v000001/model.onnx: graph has no initializers (no weights)"
    )


def test_external_data_is_refused(version):
    model = onnx.load(version / "model.onnx")
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    init.external_data.add(key="location", value="weights.bin")
    onnx.save(model, version / "model.onnx")
    rehash(version)
    assert modelfile.check(version) == (
        "v000001/model.onnx: initializer layer0.weight has external data (never written here)"
    )


def test_missing_model_onnx(version):
    (version / "model.onnx").unlink()
    assert modelfile.check(version) == "v000001/model.onnx: missing (listed in metadata.json)"


def test_model_onnx_not_listed(version):
    meta = meta_of(version)
    del meta["files"]["model.onnx"]
    write_meta(version, meta)
    assert modelfile.check(version) == ("v000001/metadata.json: files: model.onnx is not listed")


def test_truncated_checkpoint(trained, backend, tmp_path):
    d = shutil.copytree(trained[backend], tmp_path / "v000001")
    name = CHECKPOINT[backend]
    size = (d / name).stat().st_size
    (d / name).write_bytes((d / name).read_bytes()[:100])
    assert modelfile.check(d) == (
        f"v000001/{name}: 100 bytes, metadata.json says {size} (truncated or damaged)"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_networks_checkpoint_is_listed_and_verified(trained, backend, tmp_path):
    """The demo's 3 channels train 3 networks ("auto"): each checkpoint is a file of the
    version like model.onnx, and a damaged one is named."""
    d = shutil.copytree(trained[backend], tmp_path / "v000001")
    first = CHECKPOINT[backend]
    stem, dot, extension = first.partition(".")
    names = [first, *(f"{stem}-{k}{dot}{extension}" for k in (2, 3))]
    listed = json.loads((d / "metadata.json").read_text())["files"]
    assert sorted(listed) == sorted(["model.onnx", "report.html", *names])
    (d / names[2]).write_bytes(b"x" + (d / names[2]).read_bytes()[1:])
    assert modelfile.check(d) == (
        f"v000001/{names[2]}: sha256 does not match metadata.json (file damaged)"
    )


def test_missing_checkpoint(version):
    (version / "weights.npz").unlink()
    assert modelfile.check(version) == "v000001/weights.npz: missing (listed in metadata.json)"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "missing"),
        (b"", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
        (b'{"files": {', "not valid JSON (Expecting property name enclosed in double quotes"),
        (b'{"files": "\xff\xfe"}', "not UTF-8"),
        (b"[1, 2]", "not a JSON object"),
        (b"[" * 100000, "not valid JSON (maximum recursion depth exceeded"),
        (b'{"n": 1' + b"0" * 5000 + b"}", "not valid JSON (Exceeds the limit (4300 digits)"),
    ],
)
def test_missing_or_garbage_metadata(version, content, problem):
    if content is None:
        (version / "metadata.json").unlink()
    else:
        (version / "metadata.json").write_bytes(content)
    assert modelfile.check(version).startswith(f"v000001/metadata.json: {problem}")


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (("threshold",), math.nan, "threshold: expected a finite number, got NaN"),
        (("threshold",), math.inf, "threshold: expected a finite number, got Infinity"),
        (("threshold",), None, "threshold: expected a number, got null"),
        (("threshold",), "0.5", 'threshold: expected a number, got "0.5"'),
        (("threshold",), DELETE, "threshold: missing"),
        (("files",), DELETE, "files: missing"),
        (("normalization",), DELETE, "normalization: missing"),
        (("metrics", "val_loss"), math.nan, "metrics.val_loss: expected a finite number >= 0"),
        (("metrics", "train_loss"), -math.inf, "metrics.train_loss: expected a finite number"),
        (("normalization", "mean", 1), math.nan, "normalization.mean[1]: expected a finite"),
        (("normalization", "scale", 2), math.inf, "normalization.scale[2]: expected a finite"),
        (("normalization", "scale", 0), 0.0, "normalization.scale[0]: expected a number > 0"),
        (("normalization", "mean"), [], "normalization.mean: expected at least 1 item(s)"),
        (("normalization", "mean"), [0.0], "normalization.mean: 1 values for 3 channel(s)"),
        (("normalization",), [1, 2], "normalization: expected an object, got [1, 2]"),
        (("files",), [], "files: expected an object, got []"),
        (("files", "../x"), {}, 'files: lists "../x", not a file name'),
        (("files", "model.onnx", "sha256"), "ab", "files.model.onnx.sha256: expected 64 hex"),
        (("files", "model.onnx", "bytes"), True, "files.model.onnx.bytes: expected an integer"),
    ],
)
def test_unusable_numbers_in_metadata(version, path, value, problem):
    """Python's json writes NaN/Infinity unquoted, so a diverged fit lands in the file as is."""
    meta = meta_of(version)
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    write_meta(version, meta)
    assert modelfile.check(version).startswith(f"v000001/metadata.json: {problem}")


def test_importing_it_loads_no_numpy_or_onnx():
    """The daemon calls check() before every use of a model and must stay lean (≤45 MB)."""
    code = (
        "import sys, smocsd.modelfile; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'onnx', 'onnxruntime'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
