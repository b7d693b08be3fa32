"""Lets PyPI's torch train on the CPU without its 3 GB of nvidia-* wheels (bench/perf.py).

    .bench/bin/pip install --no-deps torch        # the wheel alone, ~1.2 GB installed
    .bench/bin/python bench/torch_cpu.py          # needs gcc

On x86_64 Linux, PyPI has only CUDA builds of torch: the wheel links the CUDA libraries
(libcudart, libcublas, libcudnn, ...), which its nvidia-* and triton dependencies bring
(3 GB of them, 4 GB with triton), and `import torch` fails without them. Its CPU kernels
need none of them, so this writes a stub of each missing library into torch/lib, where
torch's libraries look last (after the nvidia-* wheels' folders, which win when those
wheels are installed): every function it is asked for returns 100 (cudaErrorNoDevice), so
`torch.cuda.is_available()` is False and nothing else calls them. It then trains a few
steps on the CPU to show that it works. On aarch64, PyPI's torch is the CPU build and
nothing is missing.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

# An unversioned symbol that no present library defines goes into this library's stub.
CATCH_ALL = "libnccl.so.2"


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def dynamic_symbols(elf: Path) -> list[list[str]]:
    """readelf's rows of the dynamic symbol table: [.., type, bind, vis, ndx, name@version]."""
    rows = [line.split() for line in run("readelf", "--dyn-syms", "-W", str(elf)).splitlines()]
    return [r for r in rows if len(r) >= 8 and r[0].endswith(":")]


def wanted_symbols(elves: list[Path]) -> dict[str, dict[str | None, dict[str, str]]]:
    """missing library -> symbol version (None: unversioned) -> symbol -> symbol type."""
    missing: set[str] = set()
    present = set(elves)
    for elf in elves:
        for line in run("ldd", str(elf)).splitlines():
            if m := re.match(r"\s*(\S+) => not found", line):
                missing.add(m[1])
            elif m := re.match(r"\s*\S+ => (/\S+)", line):
                present.add(Path(m[1]))
    defined = {r[7].split("@")[0] for lib in present for r in dynamic_symbols(lib) if r[6] != "UND"}
    owner: dict[str, str] = {}  # symbol version -> the missing library that defines it
    for elf in elves:
        needed = None
        for line in run("readelf", "-V", "-W", str(elf)).splitlines():
            if m := re.search(r"File: (\S+)", line):
                needed = m[1]
            elif (m := re.search(r"Name: (\S+)", line)) and needed in missing:
                owner[m[1]] = needed
    wanted: dict[str, dict[str | None, dict[str, str]]] = {
        lib: defaultdict(dict) for lib in missing
    }
    for elf in elves:
        for row in dynamic_symbols(elf):
            if row[6] != "UND":
                continue
            name, _, version = row[7].partition("@")
            version = version.split(" ")[0]
            if version in owner:
                wanted[owner[version]][version][name] = row[3]
            elif not version and name not in defined and row[4] != "WEAK" and missing:
                wanted[CATCH_ALL if CATCH_ALL in missing else min(missing)][None][name] = row[3]
    return wanted


def build_stub(lib: str, versions: dict[str | None, dict[str, str]], out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        symbols = {s: t for by_version in versions.values() for s, t in by_version.items()}
        Path(tmp, "stub.c").write_text(
            "".join(
                f"char {s}[256];\n" if t == "OBJECT" else f"int {s}(void) {{ return 100; }}\n"
                for s, t in sorted(symbols.items())
            )
        )
        command = ["gcc", "-shared", "-fPIC", "-w", "-o", str(out), f"{tmp}/stub.c"]
        command.append(f"-Wl,-soname,{lib}")
        named = [v for v in versions if v is not None]
        if named:  # the symbol versions its users ask for, or the loader refuses it
            Path(tmp, "stub.map").write_text(
                "".join(
                    f"{v} {{ global: {' '.join(s + ';' for s in versions[v])} }};\n" for v in named
                )
            )
            command.append(f"-Wl,--version-script={tmp}/stub.map")
        subprocess.run(command, check=True)


def main() -> int:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("torch is not installed: pip install --no-deps torch")
    torch_dir = Path(spec.submodule_search_locations[0])
    elves = sorted((torch_dir / "lib").glob("*.so*")) + sorted(torch_dir.glob("_C*.so"))
    wanted = wanted_symbols(elves)
    for lib, versions in sorted(wanted.items()):
        build_stub(lib, versions, torch_dir / "lib" / lib)
        print(f"stub {lib}: {sum(map(len, versions.values()))} symbols")
    check = (
        "import torch; torch.set_num_threads(1); torch.manual_seed(0)\n"
        "m = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 30))\n"
        "o = torch.optim.AdamW(m.parameters(), lr=1e-2); x = torch.randn(256, 30)\n"
        "first = None\n"
        "for _ in range(100):\n"
        "    o.zero_grad(); loss = torch.nn.functional.mse_loss(m(x), x); loss.backward()\n"
        "    o.step(); first = first or loss.item()\n"
        "assert not torch.cuda.is_available() and loss.item() < first\n"
        "print(f'torch {torch.__version__} trains on the CPU: '\n"
        "      f'loss {first:.3f} -> {loss.item():.3f}')\n"
    )
    print(run(sys.executable, "-c", check).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
