"""Publish a converted LLaMA-Omni directory to a Hub model repo, and build + publish its Gradio Space.

    python conversion/push_to_hub.py llama-omni-hf --repo-id NAME/Llama-3.1-8B-Omni-hf \\
        [--space-id NAME/llama-omni] [--no-space] [--private] [--revision BRANCH] [--dry-run]

Token: `--token`, else HF_TOKEN, else the one saved by `hf auth login`. Uploads use huggingface_hub's
`create_repo` and `upload_folder`; nothing local is modified (the model card's placeholder id and the Space
files are staged in a temporary directory). An interrupted push is resumed by running the same command:
files already on the Hub are skipped.

The Space: `app.py` from the project root, the `llama_omni_hf` package it imports, `examples/*.wav`,
`requirements.txt` (the project's dependencies), `packages.txt` (ffmpeg) and a README whose front matter
selects the Gradio SDK and suggests a GPU. The model id reaches the app as the Space variable
LLAMA_OMNI_MODEL (and in the front matter's `models:`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import tomllib
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conversion.model_card import LICENCE_NOTICE, MODEL_ID_PLACEHOLDER

ROOT = Path(__file__).resolve().parent.parent
# 8B in fp16 is ~17 GB of weights: an A10G (24 GB) is the smallest common Space GPU that holds it.
DEFAULT_HARDWARE = "a10g-small"
REQUIRED_FILES = ["config.json", "configuration_llama_omni.py", "modeling_llama_omni.py",
                  "processing_llama_omni.py", "transformers_compat.py", "processor_config.json"]
# LLaMA-Omni2 repos carry LLaMA-Omni's files too (the shared speech input and processor), plus their own
OMNI2_REQUIRED_FILES = REQUIRED_FILES + ["configuration_llama_omni2.py", "modeling_llama_omni2.py",
                                         "processing_llama_omni2.py"]
CONVERTERS = {"llama_omni": "conversion/convert_llama_omni.py", "llama_omni2": "conversion/convert_llama_omni2.py"}


class PushError(Exception):
    """A problem explained for the user; nothing local was changed."""


def check_converted(directory: Path) -> str:
    """The family ("llama_omni" or "llama_omni2") of a complete converted repo, else a PushError."""
    try:
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    required = OMNI2_REQUIRED_FILES if model_type == "llama_omni2" else REQUIRED_FILES
    missing = [name for name in required if not (directory / name).is_file()]
    weights = list(directory.glob("*.safetensors"))
    if missing or not weights:
        raise PushError(f"{directory} is not a converted LLaMA-Omni repo (missing: {', '.join(missing) or 'weights'}); "
                        f"run {CONVERTERS.get(model_type, CONVERTERS['llama_omni'])} first")
    if model_type not in CONVERTERS:
        raise PushError(f"{directory}/config.json is not a llama_omni or llama_omni2 config")
    return model_type


def stage_model(directory: Path, repo_id: str, staging: Path) -> Path:
    """Links to the converted files; the model card gets the real repo id instead of the placeholder."""
    staging.mkdir()
    for path in sorted(directory.rglob("*")):  # files, and folders such as LLaMA-Omni2's tts_tokenizer/
        relative = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).symlink_to(path.resolve())
    card = directory / "README.md"
    if card.is_file() and MODEL_ID_PLACEHOLDER in card.read_text():
        (staging / "README.md").unlink()
        (staging / "README.md").write_text(card.read_text().replace(MODEL_ID_PLACEHOLDER, repo_id))
    return staging


def space_requirements() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [d for d in project["dependencies"]]
    lines += [d for d in project.get("optional-dependencies", {}).get("app", []) if not d.startswith("gradio")]
    lines.append("spaces")  # ZeroGPU decorator; app.py falls back to a no-op without it
    return "# gradio comes from the README's sdk_version\n" + "\n".join(lines) + "\n"


def gradio_version() -> str:
    """The Space runs the Gradio the app was developed with (the README's sdk_version installs it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradio")
    except PackageNotFoundError:
        raise PushError("gradio is not installed, so the Space's sdk_version is unknown: install the project's "
                        "app extra (pip install -e .[app]) or pass --no-space") from None


SIZE_NOTES = {
    "llama_omni": "The 8B model in float16 needs a GPU with 24 GB (suggested: `{hardware}`).",
    "llama_omni2": "LLaMA-Omni2 answers in 24 kHz speech; 0.5B-7B in bfloat16 fit a 24 GB GPU (suggested: "
                   "`{hardware}`), 14B and 32B need more.",
}


def space_readme(model_id: str, title: str, hardware: str, family: str = "llama_omni") -> str:
    return f"""---
title: {title}
emoji: 🦙
colorFrom: indigo
colorTo: purple
sdk: gradio
sdk_version: {gradio_version()}
app_file: app.py
suggested_hardware: {hardware}
models:
- {model_id}
license: other
short_description: Ask by voice; streaming text and speech answers ({title})
---

# {title}: talk to it

Speak (or upload) a question: the answer's text and speech stream back together, with the measured time to
first text and first audio. Model: [{model_id}](https://huggingface.co/{model_id}), set by the Space
variable `LLAMA_OMNI_MODEL`. {SIZE_NOTES[family].format(hardware=hardware)}

{LICENCE_NOTICE}
"""


def stage_space(app: Path, model_id: str, title: str, hardware: str, staging: Path, family: str = "llama_omni") -> Path:
    if not app.is_file():
        raise PushError(f"the demo app {app} does not exist, so the Space cannot be built; pass --app PATH, "
                        "or --no-space to publish the model only")
    staging.mkdir()
    shutil.copyfile(app, staging / "app.py")
    package = ROOT / "llama_omni_hf"  # app.py imports it
    shutil.copytree(package, staging / "llama_omni_hf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    examples = sorted((app.parent / "examples").glob("*.wav"))
    if examples:
        (staging / "examples").mkdir()
        for wav in examples:
            shutil.copyfile(wav, staging / "examples" / wav.name)
    (staging / "requirements.txt").write_text(space_requirements())
    (staging / "packages.txt").write_text("ffmpeg\n")  # audio decoding of uploads and microphone recordings
    (staging / "README.md").write_text(space_readme(model_id, title, hardware, family))
    return staging


def listing(title: str, folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    rows = "\n".join(f"    {p.relative_to(folder)}  ({p.stat().st_size / 1e6:.2f} MB)" for p in files)
    return f"{title}: {len(files)} files, {total / 1e9:.3f} GB\n{rows}"


def publish(api, folder: Path, repo_id: str, repo_type: str, args, **create) -> str:
    url = api.create_repo(repo_id, repo_type=repo_type, private=args.private or None, exist_ok=True, **create)
    if args.revision and args.revision != "main":
        api.create_branch(repo_id, repo_type=repo_type, branch=args.revision, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=str(folder),
                               revision=args.revision, commit_message=args.commit_message)
    print(f"{repo_type} {url} <- {commit.commit_url if hasattr(commit, 'commit_url') else commit}", flush=True)
    return str(url)


def push(args) -> None:
    from huggingface_hub import HfApi, get_token

    directory = Path(args.converted_dir)
    family = check_converted(directory)
    space_id = None if args.no_space else (args.space_id or f"{args.repo_id}-demo")
    title = args.space_title or {"llama_omni": "LLaMA-Omni", "llama_omni2": "LLaMA-Omni2"}[family]
    with tempfile.TemporaryDirectory(prefix="llama-omni-push-") as tmp:
        model_folder = stage_model(directory, args.repo_id, Path(tmp) / "model")
        space_folder = None if space_id is None else stage_space(
            Path(args.app), args.repo_id, title, args.space_hardware, Path(tmp) / "space", family)
        if args.dry_run:
            print("dry run: nothing is uploaded")
            print(listing(f"model repo {args.repo_id} (revision {args.revision or 'main'})", model_folder))
            if space_folder is not None:
                print(listing(f"Space {space_id} (variable LLAMA_OMNI_MODEL={args.repo_id})", space_folder))
            return
        token = args.token or get_token()
        if not token:
            raise PushError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token")
        api = HfApi(token=token)
        user = api.whoami()["name"]
        print(f"publishing as {user} to {api.endpoint}", flush=True)
        publish(api, model_folder, args.repo_id, "model", args)
        if space_folder is not None:
            publish(api, space_folder, space_id, "space", args, space_sdk="gradio")
            api.add_space_variable(space_id, "LLAMA_OMNI_MODEL", args.repo_id,
                                   description="model repo the app loads")


def explain(err: Exception, endpoint: str) -> str | None:
    """A clear message for network and Hub errors; None for anything else (a bug: let it raise)."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(err, "response", None), "status_code", None)
    resume = "Nothing local was changed; run the same command again to resume (uploaded files are skipped)."
    if isinstance(err, HfHubHTTPError) and status == 401:
        return f"the Hub at {endpoint} rejected the token (401): set HF_TOKEN or run `hf auth login`. {resume}"
    if isinstance(err, HfHubHTTPError) and status == 403:
        return f"the token has no write access there (403): {str(err).splitlines()[0]}. {resume}"
    if isinstance(err, HfHubHTTPError):
        return f"the Hub at {endpoint} answered {status}: {' '.join(str(err).split())[:400]}. {resume}"
    names = {cls.__module__.split(".")[0] for cls in type(err).__mro__}
    if isinstance(err, (ConnectionError, TimeoutError, socket.gaierror)) or names & {
            "httpx", "httpx2", "httpcore", "requests", "urllib3"}:
        return f"could not reach the Hub at {endpoint}: {type(err).__name__}: {err}. {resume}"
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("converted_dir", help="output of convert_llama_omni.py or convert_llama_omni2.py")
    p.add_argument("--repo-id", required=True, help="model repo, NAME/REPO")
    p.add_argument("--space-id", help="Space repo (default: REPO-ID-demo)")
    p.add_argument("--no-space", action="store_true", help="publish the model only")
    p.add_argument("--app", default=str(ROOT / "app.py"), help="the Gradio app (default: the project's app.py)")
    p.add_argument("--space-title", help="default: LLaMA-Omni or LLaMA-Omni2, from the repo's config")
    p.add_argument("--space-hardware", default=DEFAULT_HARDWARE, help="suggested_hardware in the Space README")
    p.add_argument("--private", action="store_true", help="create the repos private")
    p.add_argument("--revision", help="branch to push to (created if needed; default main)")
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--commit-message", default="Upload LLaMA-Omni converted with llama-omni-hf")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        push(args)
    except PushError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        message = explain(err, endpoint)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
