"""`edge-agent`: the device-side command line (standard library argparse: the device stays light)."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import numpy as np

from runtime_agent import __version__
from runtime_agent.bundle import read_bundle
from runtime_agent.errors import AgentError
from runtime_agent.model import LoadedModel
from runtime_agent.signing import PUBLIC_KEY_NAME, default_key_dir, load_public_key


def _load_input(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """A .npy array (a one-input model), or a .npz holding one array per input name."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise AgentError(f"input file {path} does not exist") from None
    except (ValueError, OSError) as exc:
        raise AgentError(f"input file {path} is not a .npy or .npz file ({exc}); save it with numpy.save or numpy.savez") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    return loaded


def cmd_predict(args: argparse.Namespace) -> int:
    bundle = read_bundle(args.bundle, load_public_key(args.pubkey))
    model = LoadedModel.from_bundle(bundle)
    prediction = model.predict(_load_input(args.input))
    if prediction.classes is not None:  # a classifier: one line per sample with its label
        if args.json:
            print(json.dumps({"model": bundle.manifest["name"], "version": bundle.version,
                              "labels": prediction.labels, "classes": prediction.classes.tolist(),
                              "scores": prediction.scores.round(6).tolist()}))
        else:
            for index, (label, scores) in enumerate(zip(prediction.labels, prediction.scores)):
                print(f"{index}\t{label}\t{scores.max():.4f}")
    elif args.json:
        print(json.dumps({"model": bundle.manifest["name"], "version": bundle.version,
                          "outputs": {name: array.tolist() for name, array in prediction.outputs.items()}}))
    else:  # one line per sample and output: its values, flattened
        for index in range(len(prediction.logits)):
            for name, array in prediction.outputs.items():
                print(f"{index}\t{name}\t{' '.join(f'{v:.6g}' for v in np.ravel(array[index]).tolist())}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from runtime_agent.process import tune_malloc

    tune_malloc()  # first: before any thread allocates (see its docstring)
    from runtime_agent.agent import Agent
    from runtime_agent.config import load_agent_config

    # INFO: one line per connect, install, rejection, probation verdict and rollback (the device's own log).
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_agent_config(args.device_dir)
    agent = Agent(config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def announce(port: int) -> None:
        manifest = agent.model.bundle.manifest
        grpc = f" and grpc://{config.serve_host}:{config.grpc_port}" if config.grpc_port is not None else ""
        print(f"serving {manifest['name']} v{manifest['version']} on http://{config.serve_host}:{port}{grpc} as "
              f"{config.device_id} (fleet {config.fleet}); reporting to {config.broker_host}:{config.broker_port}", flush=True)

    agent.run(stop, on_ready=announce)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="Serve signed model bundles on an edge device.")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="verify a bundle and run it once on a .npy (or .npz) input")
    predict.add_argument("--bundle", type=Path, required=True, help="signed .bundle file")
    predict.add_argument("--input", type=Path, required=True,
                         help=".npy array: one sample or a batch; for a model with several inputs, a .npz with one array per input name")
    predict.add_argument("--pubkey", type=Path, default=default_key_dir() / PUBLIC_KEY_NAME,
                         help="trusted public key (default: %(default)s)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.set_defaults(handler=cmd_predict)
    run = commands.add_parser("run", help="serve the installed bundle and report telemetry over MQTT")
    run.add_argument("--device-dir", type=Path, required=True, help="folder with agent.toml")
    run.set_defaults(handler=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except AgentError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
