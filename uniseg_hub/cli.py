"""The ``uniseg-hub`` command line: a thin ``fire`` layer over the package's functions.

Exit codes: 0 success, 1 failure (one line on stderr, no traceback), 2 usage error (unknown command or option,
rejected before anything runs). Every command has ``--help``.
"""

from __future__ import annotations

import json as jsonlib
import sys

import fire

from .errors import UnisegHubError


def reject_unknown(unknown: dict) -> None:
    """fire runs a command before complaining about options it could not use; fail first instead (exit 2)."""
    if unknown:
        flags = " ".join(f"--{k}" for k in unknown)
        raise fire.core.FireError(f"unknown option(s): {flags}; see --help")


def emit(result: dict, as_json: bool, text: str) -> None:
    """Print ``text`` for people, or ``result`` as JSON for programs."""
    print(jsonlib.dumps(result, indent=2) if as_json else text)


def convert(src: str, out_dir: str, overwrite: bool = False, json: bool = False, **unknown) -> None:
    """Convert an official UniSeg checkpoint (nnU-Net v1 .model file) into a safetensors folder.

    The file is read with an allow-listed weights-only load (no pickled code runs); the architecture is read from
    the tensor shapes; OUT_DIR receives model.safetensors and config.json.

    Args:
        src: the official .model file (e.g. model_final_checkpoint.model from the UniSeg release).
        out_dir: folder to write; load it with uniseg_hub.load_model(OUT_DIR) or load_encoder(OUT_DIR).
        overwrite: replace model.safetensors/config.json already in OUT_DIR.
        json: print the result as JSON.
    """
    reject_unknown(unknown)
    from .weights import convert_checkpoint, read_folder, sha256_file, WEIGHTS_FILE

    out = convert_checkpoint(str(src), str(out_dir), overwrite=bool(overwrite))
    config, state = read_folder(out)
    weights = out / WEIGHTS_FILE
    result = {
        "folder": str(out), "architecture": config["architecture"], "config": config["config"],
        "tensors": len(state), "parameters": sum(t.numel() for t in state.values()),
        "sha256": sha256_file(weights), "size": weights.stat().st_size, "source": config["source"],
    }
    emit(result, json, f"converted {src} -> {out} ({result['architecture']}, {result['tensors']} tensors, "
                       f"{result['parameters']:,} parameters, sha256 {result['sha256']})")


COMMANDS = {"convert": convert}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``uniseg-hub`` console script (returns None: see fire's exit-code pitfall)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv and any(a in ("-h", "--help") for a in argv):
        # commands take **unknown (to reject misspelt flags), which would swallow --help: route it to fire's help
        argv = [a for a in argv if a not in ("-h", "--help")] + ["--", "--help"]
    try:
        fire.Fire(COMMANDS, command=argv, name="uniseg-hub")
    except UnisegHubError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:
        print(f"error: {e.strerror or e} ({e.filename or ''})", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
