"""The committed *_pb2.py files are what protoc makes of our .proto files today."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


PROTOS = sorted(p.relative_to(ROOT) for p in (ROOT / "agent" / "proto").glob("*.proto"))


@pytest.mark.parametrize("proto", PROTOS, ids=str)
def test_generated_code_matches_proto(tmp_path, proto):
    pytest.importorskip("grpc_tools")
    shutil.copytree(ROOT / "agent", tmp_path / "agent",
                    ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", str(proto)],
                   cwd=tmp_path, check=True)
    generated = (tmp_path / proto).with_name(proto.stem + "_pb2.py").read_text()
    committed = (ROOT / proto).with_name(proto.stem + "_pb2.py").read_text()
    # The protoc version lines may differ; the serialized descriptor must not.
    gen_desc = next(l for l in generated.splitlines() if "AddSerializedFile" in l)
    com_desc = next(l for l in committed.splitlines() if "AddSerializedFile" in l)
    assert gen_desc == com_desc, f"{proto} changed: run `make proto`"
