"""SLURM node lists -> host names -> a DeepSpeed hostfile.

    python launch/slurm/hostfile.py --nodelist "$SLURM_JOB_NODELIST" --slots 8 --out hostfile
    python launch/slurm/hostfile.py --nodelist "node[001-004,010]" --head        # prints node001

``train.sbatch`` launches with torchrun and needs no hostfile; this helper serves the
``deepspeed --hostfile`` launcher (an interactive ``salloc``, DeepSpeed's autotuner) and
records the job's nodes in its log directory. ``scontrol show hostnames`` is used when
it is on PATH (it knows every syntax SLURM accepts); otherwise the node list is expanded
here: comma-separated names, each with any number of bracket groups of comma-separated
numbers or ``a-b`` ranges, zero padding kept (``gpu[01-02]-ib`` -> ``gpu01-ib gpu02-ib``).
Standard library only, so it runs on login nodes without the project's environment.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shutil
import subprocess
from pathlib import Path

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(nodelist: str) -> list[str]:
    """Split at commas outside brackets: ``a[1,2],b`` -> ``["a[1,2]", "b"]``."""
    parts, depth, current = [], 0, []
    for char in nodelist:
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"node list {nodelist!r} nests brackets; SLURM node lists never do")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"node list {nodelist!r} closes a bracket it never opened")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f"node list {nodelist!r} leaves a bracket open")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expand_group(group: str, nodelist: str) -> list[str]:
    """``001-003,010`` -> ``["001", "002", "003", "010"]`` (the width of the lower bound is kept)."""
    values = []
    for item in group.split(","):
        match = _RANGE.match(item.strip())
        if not match:
            raise ValueError(f"node list {nodelist!r}: {item!r} is neither a number nor a range a-b")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"node list {nodelist!r}: range {item!r} runs backwards")
        width = len(low) if low.startswith("0") else 0
        values += [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``node[001-004,010],login1``) into host names, in order."""
    hosts: list[str] = []
    for name in _split_top_level(nodelist):
        pieces = re.split(r"\[([^\]]*)\]", name)  # literal, group, literal, group, ..., literal
        choices = [[piece] if i % 2 == 0 else _expand_group(piece, nodelist) for i, piece in enumerate(pieces)]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    if not hosts:
        raise ValueError(f"node list {nodelist!r} names no host")
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """Host names of a node list: ``scontrol show hostnames`` when available, else ``expand_nodelist``."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return expand_nodelist(nodelist)
    result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    hosts = result.stdout.split()
    if not hosts:
        raise ValueError(f"scontrol show hostnames {nodelist!r} printed no host")
    return hosts


def hostfile_text(hosts: list[str], slots: int) -> str:
    """DeepSpeed hostfile lines: ``<host> slots=<GPUs>``, one per host."""
    if slots < 1:
        raise ValueError(f"slots={slots}: every host needs at least one GPU slot")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"hosts repeat in {hosts}; a DeepSpeed hostfile lists each host once")
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def write_hostfile(hosts: list[str], slots: int, path: str | Path) -> Path:
    """Write a DeepSpeed hostfile for ``hosts`` with ``slots`` GPUs each; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hostfile_text(hosts, slots))
    return path


def main(argv: list[str] | None = None) -> None:
    """Print the head node, or write a hostfile, for a SLURM node list."""
    parser = argparse.ArgumentParser(description="Expand a SLURM node list; write a DeepSpeed hostfile.")
    parser.add_argument("--nodelist", required=True, help="e.g. $SLURM_JOB_NODELIST or 'node[001-004,010]'")
    parser.add_argument("--slots", type=int, default=8, help="GPUs per host (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write the hostfile here")
    parser.add_argument("--head", action="store_true", help="print the first host (the rendezvous host)")
    args = parser.parse_args(argv)
    hosts = hostnames(args.nodelist)
    if args.head:
        print(hosts[0])
    if args.out:
        write_hostfile(hosts, args.slots, args.out)
    if not args.head and not args.out:
        print("\n".join(hosts))


if __name__ == "__main__":
    main()
