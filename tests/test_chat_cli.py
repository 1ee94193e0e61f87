"""model.chat (multi-turn, image kept in context), stream_chat, and the ``python -m mmkit.chat`` command line."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmkit
from mmkit.chat import DEFAULT_MAX_NEW_TOKENS as CLI_DEFAULT_MAX_NEW_TOKENS
from mmkit.chat import main as cli_main
from mmkit.infer.chat import DEFAULT_MAX_NEW_TOKENS, ChatHistory, build_chat_inputs, chat, stream_chat

ROOT = Path(__file__).resolve().parents[1]
SPECIAL_IDS = range(5)  # <unk> <s> </s> <pad> <image> of the builtin word tokenizer


def make_chat_model_dir(path: Path, seed: int = 0) -> Path:
    """The tiny demo model (random init, real word tokenizer, vicuna_v1) saved as an mmkit dir.

    The LM-head rows of the special tokens are zeroed so that greedy decoding emits words and never
    eos: replies are non-empty and run to max_new_tokens (a random model would often say only ``<s>``).
    """
    torch.manual_seed(seed)
    model = mmkit.build(ROOT / "recipes" / "tiny.yaml").eval()
    with torch.no_grad():
        for i in SPECIAL_IDS:
            model.llm.lm_head.weight[i].zero_()
    model.save(path)
    return path


def save_image(path: Path, color=(255, 0, 0), size=(40, 30)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_chat_model_dir(tmp_path_factory.mktemp("chat-model") / "tiny")


@pytest.fixture(scope="module")
def model(model_dir):
    return mmkit.load(model_dir).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    return save_image(d / "red.png"), save_image(d / "blue.png", (0, 0, 255), (30, 50))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "mmkit.chat", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=ROOT)


# --------------------------------------------------------------------------- chat()


def test_chat_is_multi_turn_and_keeps_the_image(model, images):
    img = Image.open(images[0])
    calls = []
    handle = model.vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        reply1, h1 = model.chat(img, "what color is the shape ?", max_new_tokens=6)
        reply2, h2 = model.chat(None, "what shape is it ?", history=h1, max_new_tokens=6)
    finally:
        handle.remove()
    assert reply1 and reply2
    assert isinstance(h1, ChatHistory) and len(h1.messages) == 2 and len(h1.images) == 1  # h1 not mutated
    assert [m["role"] for m in h2.messages] == ["user", "assistant", "user", "assistant"]
    assert h2.messages[1]["content"] == reply1 and h2.messages[3]["content"] == reply2
    assert h2.messages[0]["content"].startswith("<image>") and "<image>" not in h2.messages[2]["content"]
    assert len(h2.images) == 1
    assert calls == [1, 1]  # the image is encoded again on turn 2: it is still in the context
    # the second turn's prompt holds the image tokens and the whole first exchange, in the model's template
    inputs = build_chat_inputs(model, h2.messages[:3], h2.images)
    ids = inputs["input_ids"][0]
    assert int((ids == model.image_token_id).sum()) == model.processor.num_image_tokens((30, 40))
    text = model.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    assert "USER" in text and "ASSISTANT" in text and reply1 in text
    # and the same as generating from that prompt directly
    direct = model.generate(**inputs, max_new_tokens=6, return_text=True)[0].strip()
    assert direct == reply2


def test_chat_image_path_and_plain_message_history(model, images):
    reply, hist = chat(model, str(images[0]), "what color ?", max_new_tokens=4)
    assert len(hist.images) == 1 and hist.images[0].mode == "RGB"
    reply2, hist2 = chat(model, None, "hello", history=[{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "red"}],
                         max_new_tokens=4)
    assert len(hist2.messages) == 4 and hist2.images == []


def test_stream_chat_matches_chat(model, images):
    img = Image.open(images[0])
    reply, hist = chat(model, img, "what color ?", max_new_tokens=8)
    stream = stream_chat(model, img, "what color ?", max_new_tokens=8)
    deltas = list(stream)
    assert len(deltas) > 1 and "".join(deltas).strip() == reply == stream.reply
    assert stream.history.messages == hist.messages
    assert stream.finish_reason == "length"


def test_chat_sampling_options_pass_through(model, images):
    img = Image.open(images[0])
    a, _ = chat(model, img, "what color ?", max_new_tokens=8, temperature=3.0, seed=7)
    b, _ = chat(model, img, "what color ?", max_new_tokens=8, temperature=3.0, seed=7)
    assert a == b


# --------------------------------------------------------------------------- command line


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--image", "--query", "--max-new-tokens", "--temperature", "--load-4bit", "--load-8bit"):
        assert flag in out
    assert "/reset" in out and "/image" in out
    assert f"default: {DEFAULT_MAX_NEW_TOKENS}" in out  # the CLI's copy of the library default agrees
    assert CLI_DEFAULT_MAX_NEW_TOKENS == DEFAULT_MAX_NEW_TOKENS


def test_cli_query_prints_one_answer(model, model_dir, images, capsys):
    expected, _ = chat(model, Image.open(images[0]), "what color ?", max_new_tokens=5)
    rc = cli_main(["--model", str(model_dir), "--image", str(images[0]), "--query", "what color ?",
                   "--max-new-tokens", "5", "--temperature", "0"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == expected


def test_cli_interactive_through_stdin(model, model_dir, images, tmp_path):
    img = Image.open(images[0])
    r1, h1 = chat(model, img, "what color ?", max_new_tokens=5)
    r2, _ = chat(model, None, "what shape ?", history=h1, max_new_tokens=5)
    r3, _ = chat(model, img, "hello there", max_new_tokens=5)  # after /reset: the image again, fresh history
    r4, _ = chat(model, Image.open(images[1]), "and now ?", max_new_tokens=5)
    script = "\n".join([
        "what color ?", "what shape ?", "/reset", "hello there", f"/image {images[1]}", "and now ?",
        f"/image {tmp_path / 'missing.png'}", "/bogus", "/exit", "never read",
    ]) + "\n"
    out = _run(["--model", str(model_dir), "--image", str(images[0]), "--max-new-tokens", "5"], stdin=script)
    assert out.returncode == 0, out.stderr
    answers = [line.split("ASSISTANT: ", 1)[1] for line in out.stdout.splitlines() if "ASSISTANT: " in line]
    assert answers == [r1, r2, r3, r4]
    assert "conversation reset" in out.stdout
    assert "new image" in out.stdout
    assert "cannot open image" in out.stdout
    assert "unknown command '/bogus'" in out.stdout


def test_cli_interactive_ends_on_eof(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert cli_main(["--model", str(model_dir), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("ASSISTANT: ") == 1


def test_cli_bad_paths_are_clear_errors(model_dir, tmp_path, capsys):
    assert cli_main(["--model", str(tmp_path / "nope"), "--query", "hi"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli_main(["--model", str(model_dir), "--image", str(tmp_path / "nope.png"), "--query", "hi"]) == 2
    assert "--image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--model", str(model_dir), "--load-4bit", "--load-8bit"])


def test_cli_load_4bit(model_dir, images, capsys):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'mmkit[quant]')")
    assert cli_main(["--model", str(model_dir), "--image", str(images[0]), "--query", "what color ?",
                     "--max-new-tokens", "4", "--load-4bit"]) == 0
    cap = capsys.readouterr()
    assert "4bit:" in cap.err and cap.out.strip()


def test_processor_batch_generate_matches_single_chats(model, images):
    """The README's public contract: model.generate(**model.processor(...)) on a left-padded batch, rows independent."""
    red, blue = Image.open(images[0]), Image.open(images[1])
    questions = ["<image>\nwhat color ?", "<image>\nwhat is the shape in the middle of the picture ?", "hello"]
    inputs = model.processor(images=[red, blue], text=questions, template=model.template)
    assert inputs["attention_mask"][:, 0].tolist().count(0) >= 1  # really padded
    texts = model.generate(**inputs, max_new_tokens=6, return_text=True)
    singles = [chat(model, img, q.replace("<image>\n", ""), max_new_tokens=6)[0]
               for img, q in zip([red, blue, None], questions)]
    assert [t.strip() for t in texts] == singles
