"""Compile one Triton kernel of an Inductor output-code file for sm90, without a GPU, and count
the instructions of its main loops: what a template change costs per tile, before any device
time is spent on it.

The output code is what ``torch._inductor.utils.run_and_get_code`` returns (ours or torch's
flex_attention, generated on a GPU, or on CPU with Inductor's Triton backend); the kernel is
compiled with its own num_warps/num_stages by Triton's bundled ptxas, which also reports
registers and spills. A loop is a backward branch whose body holds a tensor-core instruction
(HGMMA); each is printed with its instruction count and commonest opcodes, and with
``--compare`` side by side with the loops of a second kernel (e.g. torch's).

    python scripts/sass_loops.py ours.py triton_tem_fused_inductor_flex_attention_backward_1 \
        --compare torch.py triton_tem_fused_flex_attention_backward_1
"""

import argparse
import collections
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def kernel_source(output_code: str, name: str) -> tuple[str, dict, int, int]:
    """(plain @triton.jit source, signature, num_warps, num_stages) of kernel ``name``."""
    found = re.search(rf"{name} = async_compile\.triton\('{name}', '''(.*?)''', device_str='\w+'\)", output_code, re.S)
    if found is None:
        raise SystemExit(f"no kernel named {name} in the output code")
    source = found.group(1)
    decorator = re.search(r"@triton_heuristics\.\w+\((.*?)\n\)\n@triton\.jit", source, re.S)
    meta = decorator.group(1)
    warps = int(re.search(r"num_warps=(\d+)", meta).group(1))
    stages = int(re.search(r"num_stages=(\d+)", meta).group(1))
    triton_meta = re.search(r"triton_meta=(\{.*?\}),\s*\ninductor_meta", meta, re.S).group(1)
    signature = eval(triton_meta, {"DeviceProperties": lambda **_: None})["signature"]  # noqa: S307 (our own file)
    return source[:decorator.start()] + "@triton.jit" + source[decorator.end():], signature, warps, stages


def compile_for_sm90(path: Path, name: str, workdir: Path) -> tuple[str, str]:
    """(ptxas report, SASS) of kernel ``name``; every pointer taken as 16-byte aligned, as on a GPU."""
    source, signature, warps, stages = kernel_source(path.read_text(), name)
    module_path = workdir / f"{path.stem}_{name}.py"
    module_path.write_text(source)
    spec = importlib.util.spec_from_file_location(module_path.stem, module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    attrs = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind.startswith("*")}
    compiled = triton.compile(ASTSource(getattr(module, name), signature, constexprs={}, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx, cubin = module_path.with_suffix(".ptx"), module_path.with_suffix(".cubin")
    ptx.write_text(compiled.asm["ptx"])
    report = subprocess.run([NVIDIA_BIN / "ptxas", "-v", "--gpu-name=sm_90a", ptx, "-o", cubin],
                            capture_output=True, text=True, check=True).stderr
    sass = subprocess.run([NVIDIA_BIN / "nvdisasm", "-c", cubin], capture_output=True, text=True, check=True).stdout
    summary = [line.split(":", 1)[-1].strip() for line in report.splitlines() if "registers" in line or "spill" in line]
    return f"{name}: {warps} warps, {stages} stages; " + "; ".join(summary), sass


def tensor_core_loops(sass: str) -> list[collections.Counter]:
    """Opcode counts of every loop body (label .. backward branch) holding an HGMMA, in order."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"^\.(L_x_\d+):", line.strip())
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        text = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*)", line)
        if text:
            instructions.append((text.group(1).split(".")[0], text.group(2)))
    loops = []
    for end, (opcode, operands) in enumerate(instructions):
        target = re.search(r"`\(\.(L_x_\d+)\)", operands) if opcode == "BRA" else None
        if target and labels.get(target.group(1), end) < end:
            counts = collections.Counter(op for op, _ in instructions[labels[target.group(1)]:end + 1])
            if counts["HGMMA"]:
                loops.append(counts)
    return loops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_code", type=Path)
    parser.add_argument("kernel")
    parser.add_argument("--compare", nargs=2, metavar=("OUTPUT_CODE", "KERNEL"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        report, sass = compile_for_sm90(args.output_code, args.kernel, Path(workdir))
        print(report)
        loops = tensor_core_loops(sass)
        if not args.compare:
            for number, counts in enumerate(loops):
                print(f"loop {number}: {sum(counts.values())} instructions;",
                      ", ".join(f"{op} {n}" for op, n in counts.most_common(12)))
            return
        other_report, other_sass = compile_for_sm90(Path(args.compare[0]), args.compare[1], Path(workdir))
        print(other_report)
        for number, (ours, theirs) in enumerate(zip(loops, tensor_core_loops(other_sass))):
            differing = sorted(set(ours) | set(theirs), key=lambda op: -abs(ours[op] - theirs[op]))
            print(f"loop {number}: {sum(ours.values())} vs {sum(theirs.values())} instructions;",
                  ", ".join(f"{op} {ours[op]}/{theirs[op]}" for op in differing[:12] if ours[op] != theirs[op]))


if __name__ == "__main__":
    sys.exit(main())
