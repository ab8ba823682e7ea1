"""conversion/push_to_hub.py against the Hub emulator (tests/hub_emulator.py) on 127.0.0.1.

Push a converted tiny repo and its Space, then load the model back through the emulated Hub with
`AutoModel.from_pretrained("user/repo", trust_remote_code=True)` in a clean subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conversion import convert_llama_omni  # noqa: E402
from conversion.model_card import MODEL_ID_PLACEHOLDER  # noqa: E402
from conversion_fixtures import write_fake_original  # noqa: E402
from hub_emulator import HubEmulator  # noqa: E402

TOKEN, USER = "hf_emulated_write_token", "user"
PUSH = str(ROOT / "conversion" / "push_to_hub.py")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    fake = write_fake_original(tmp_path_factory.mktemp("original"))
    out = tmp_path_factory.mktemp("converted") / "llama-omni-hf"
    assert convert_llama_omni.main([
        "--checkpoint", str(fake.checkpoint), "--whisper-checkpoint", str(fake.whisper),
        "--vocoder-checkpoint", str(fake.vocoder), "--vocoder-config", str(fake.vocoder_config),
        "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A stand-in for the project's app.py, with one spoken example next to it."""
    folder = tmp_path_factory.mktemp("app")
    (folder / "app.py").write_text("import os\nMODEL = os.environ.get('LLAMA_OMNI_MODEL')\n")
    (folder / "examples").mkdir()
    (folder / "examples" / "question.wav").write_bytes(b"RIFF....WAVE")
    return folder / "app.py"


@pytest.fixture
def hub():
    with HubEmulator(tokens={TOKEN: USER}) as emulator:
        yield emulator


def hub_env(url, tmp_path, token=TOKEN) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH="")
    if token:
        env["HF_TOKEN"] = token
    return env


def run(args, env, cwd=None, timeout=300):
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


LOAD_THROUGH_HUB = textwrap.dedent("""
    import json, sys
    sys.modules["llama_omni_hf"] = None  # only the hub copy of the remote code may be used
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoProcessor
    model = AutoModel.from_pretrained("user/omni", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained("user/omni", trust_remote_code=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
    inputs = processor(audio=torch.linspace(-0.5, 0.5, 8000).sin().numpy(), sampling_rate=16000, return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=3, return_dict_in_generate=True)
    print("LOADED " + json.dumps({"class": type(model).__name__, "processor": type(processor).__name__,
                                  "new_tokens": out.sequences.shape[1] - inputs["input_ids"].shape[1],
                                  "module": type(model).__module__}))
""")


def test_push_model_and_space_then_from_pretrained_through_the_hub(converted, app, hub, tmp_path):
    before = digest(converted)
    env = hub_env(hub.url, tmp_path)
    pushed = run([PUSH, str(converted), "--repo-id", "user/omni", "--space-id", "user/omni-demo", "--app", str(app)],
                 env)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert digest(converted) == before  # nothing local changed

    files = hub.files("user/omni")
    local = {p.name: p.read_bytes() for p in converted.iterdir() if p.is_file()}
    assert set(files) == set(local)
    assert all(files[name] == data for name, data in local.items() if name != "README.md")
    card = files["README.md"].decode()
    assert MODEL_ID_PLACEHOLDER not in card and 'model_id = "user/omni"' in card

    space = hub.files("user/omni-demo", "space")
    assert space["app.py"] == app.read_bytes() and "examples/question.wav" in space
    assert "llama_omni_hf/processing_llama_omni.py" in space  # app.py imports the package
    assert space["packages.txt"].decode().split() == ["ffmpeg"]
    requirements = space["requirements.txt"].decode()
    assert "transformers" in requirements and "torch" in requirements and "\ngradio" not in requirements
    meta = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", space["README.md"].decode(), re.S).group(1))
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["models"] == ["user/omni"]
    assert meta["suggested_hardware"] == "a10g-small" and re.fullmatch(r"\d+\.\d+\.\d+", meta["sdk_version"])
    repo = hub.repos[("space", "user/omni-demo")]
    assert repo.sdk == "gradio" and repo.variables == {"LLAMA_OMNI_MODEL": "user/omni"}

    # a clean process with an empty cache downloads everything from the emulator (anonymously: public repo)
    state = tmp_path / "state.safetensors"
    loaded = run(["-c", LOAD_THROUGH_HUB, str(state)], hub_env(hub.url, tmp_path / "fresh", token=None),
                 cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    info = json.loads(loaded.stdout.split("LOADED ", 1)[1])
    assert info["class"] == "LlamaOmniForConditionalGeneration" and info["processor"] == "LlamaOmniProcessor"
    assert info["module"].startswith("transformers_modules.") and info["new_tokens"] == 3
    ours, original = load_file(state), load_file(converted / "model.safetensors")
    assert set(ours) == set(original) and all(torch.equal(ours[k], original[k]) for k in ours)
    assert ("GET", "/user/omni/resolve/" + hub.repos[("model", "user/omni")].branches["main"][0]
            + "/model.safetensors", 200) in hub.requests

    # pushing again uploads nothing new: same commits
    commits = len(hub.repos[("model", "user/omni")].commits)
    again = run([PUSH, str(converted), "--repo-id", "user/omni", "--no-space"], env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(hub.repos[("model", "user/omni")].commits) == commits


def test_private_repo_on_a_branch(converted, hub, tmp_path):
    pushed = run([PUSH, str(converted), "--repo-id", "user/omni-private", "--no-space", "--private",
                  "--revision", "v1"], hub_env(hub.url, tmp_path))
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    repo = hub.repos[("model", "user/omni-private")]
    assert repo.private and repo.branches["main"][1] == {} and "config.json" in repo.branches["v1"][1]
    anonymous = run(["-c", "from huggingface_hub import hf_hub_download as d; d('user/omni-private', 'config.json',"
                           " revision='v1')"], hub_env(hub.url, tmp_path / "anon", token=None))
    assert anonymous.returncode != 0 and "RepositoryNotFound" in anonymous.stderr


def test_dry_run_lists_files_and_contacts_nobody(converted, app, hub, tmp_path):
    dry = run([PUSH, str(converted), "--repo-id", "user/omni", "--app", str(app), "--dry-run"],
              hub_env(hub.url, tmp_path))
    assert dry.returncode == 0, dry.stderr
    assert "model.safetensors" in dry.stdout and "requirements.txt" in dry.stdout and "LLAMA_OMNI_MODEL" in dry.stdout
    assert hub.requests == [] and hub.repos == {}


@pytest.mark.parametrize("case", ["unreachable", "bad token", "no token"])
def test_hub_errors_are_clear_and_lose_nothing(case, converted, hub, tmp_path):
    before = digest(converted)
    url = "http://127.0.0.1:9" if case == "unreachable" else hub.url  # port 9 (discard): nothing listens
    token = {"unreachable": TOKEN, "bad token": "hf_wrong", "no token": None}[case]
    pushed = run([PUSH, str(converted), "--repo-id", "user/omni", "--no-space"], hub_env(url, tmp_path, token))
    expected = {"unreachable": "could not reach the Hub at http://127.0.0.1:9",
                "bad token": "rejected the token (401)", "no token": "no Hugging Face token"}[case]
    assert pushed.returncode != 0 and expected in pushed.stderr, pushed.stderr[-2000:]
    assert "Traceback" not in pushed.stderr
    assert digest(converted) == before and hub.repos == {}


def test_missing_app_or_unconverted_dir_fail_before_any_upload(converted, hub, tmp_path):
    env = hub_env(hub.url, tmp_path)
    no_app = run([PUSH, str(converted), "--repo-id", "user/omni", "--app", str(tmp_path / "nope" / "app.py")], env)
    assert no_app.returncode == 2 and "does not exist" in no_app.stderr and "--no-space" in no_app.stderr
    not_converted = run([PUSH, str(tmp_path), "--repo-id", "user/omni"], env)
    assert not_converted.returncode == 2 and "run conversion/convert_llama_omni.py first" in not_converted.stderr
    assert hub.requests == []


def test_emulator_rejects_a_space_readme_without_sdk(hub, tmp_path):
    (tmp_path / "space").mkdir()
    (tmp_path / "space" / "README.md").write_text("---\ntitle: x\n---\n")
    code = textwrap.dedent(f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("user/s", repo_type="space", space_sdk="gradio")
        api.upload_folder(repo_id="user/s", repo_type="space", folder_path={str(tmp_path / "space")!r})
    """)
    result = run(["-c", code], hub_env(hub.url, tmp_path))
    assert result.returncode != 0 and "sdk" in result.stderr and hub.repos[("space", "user/s")].commits == []


def test_push_a_llama_omni2_repo_with_its_tts_tokenizer_folder_and_load_it_through_the_hub(app, hub, tmp_path):
    """LLaMA-Omni2 repos carry a folder (tts_tokenizer/, read by unit_parse="regex"): it is published with the
    files, the Space is titled for the family, and the hub copy loads and generates in a clean process."""
    from llama_omni_hf.tiny import build_tiny_omni2_checkpoint

    repo = build_tiny_omni2_checkpoint(tmp_path / "omni2", token2wav=False)
    env = hub_env(hub.url, tmp_path)
    pushed = run([PUSH, str(repo), "--repo-id", "user/omni", "--space-id", "user/omni-demo", "--app", str(app)], env)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    files = hub.files("user/omni")
    local = {str(p.relative_to(repo)): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert "tts_tokenizer/tokenizer.json" in local
    assert set(files) == set(local)
    assert all(files[name] == data for name, data in local.items())
    assert "title: LLaMA-Omni2" in hub.files("user/omni-demo", "space")["README.md"].decode()
    script = LOAD_THROUGH_HUB.replace("save_file(", "(lambda *a: None)(")  # the tied head cannot go to safetensors
    loaded = run(["-c", script, str(tmp_path / "state.safetensors")], env, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    report = json.loads(loaded.stdout.split("LOADED ", 1)[1])
    assert report["class"] == "LlamaOmni2ForConditionalGeneration" and report["processor"] == "LlamaOmni2Processor"
    assert report["new_tokens"] == 3 and report["module"].startswith("transformers_modules")


def test_push_refuses_an_omni2_repo_without_its_remote_code(tmp_path):
    from conversion.push_to_hub import PushError, check_converted
    from llama_omni_hf.tiny import build_tiny_omni2_checkpoint

    repo = build_tiny_omni2_checkpoint(tmp_path / "omni2", token2wav=False)
    assert check_converted(repo) == "llama_omni2"
    (repo / "modeling_llama_omni2.py").unlink()
    with pytest.raises(PushError, match="modeling_llama_omni2.py.*convert_llama_omni2.py"):
        check_converted(repo)
