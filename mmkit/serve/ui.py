"""A Gradio chat page on the serving app (``python -m mmkit.serve --model DIR --ui`` -> ``/ui``).

Image upload, multi-turn chat (the image stays in context; a new image starts a new conversation),
streamed answers (through the server's batching engine, so page users share forward passes with API
clients), temperature / top-p / max-tokens controls. Gradio is told never to reach the
network: analytics off, system fonts instead of Google Fonts, no share link, no SSR node server.
"""

from __future__ import annotations

import logging
import os
import threading

from fastapi.responses import RedirectResponse

from mmkit.infer.chat import stream_chat
from mmkit.infer.engine import Engine

log = logging.getLogger("mmkit.serve.ui")

UI_PATH = "/ui"

for _key, _value in (("GRADIO_ANALYTICS_ENABLED", "False"), ("GRADIO_SSR_MODE", "False"),
                     ("GRADIO_MCP_SERVER", "False"), ("HF_HUB_OFFLINE", "1"), ("GRADIO_TELEMETRY_ENABLED", "False")):
    os.environ.setdefault(_key, _value)


def _theme(gr):
    system = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return gr.themes.Default(font=system, font_mono=mono)  # plain strings: no Google Fonts request


def build_ui(model, cfg=None, engine=None):
    """The Gradio Blocks for chatting with ``model``."""
    # gradio is optional (mmkit[serve]) and slow to import: only when the UI is asked for
    import gradio as gr

    prompt_lock = engine.prompt_lock if engine is not None else threading.Lock()
    # the server's batching engine; a page built alone gets its own (one conversation at a time each)
    batcher = engine.batcher if engine is not None else Engine(model, max_batch_size=getattr(cfg, "concurrency", 1))
    template = getattr(cfg, "template", None)
    system = getattr(cfg, "system", None)
    name = getattr(cfg, "model_name", "mmkit")
    limit = 2048
    if engine is not None:
        limit = max(1, min(limit, engine.max_tokens_limit))

    def respond(message, image, state, chatbot, temperature, top_p, max_tokens):
        message = (message or "").strip()
        chatbot = list(chatbot or [])
        state = dict(state or {})
        if not message:
            yield chatbot, state, ""
            return
        attach = image if (image is not None and not state.get("image_sent")) else None
        chatbot.append({"role": "user", "content": message})
        chatbot.append({"role": "assistant", "content": ""})
        yield chatbot, state, ""
        try:
            gen = {"max_new_tokens": int(max_tokens), "temperature": float(temperature), "top_p": float(top_p)}
            if attach is not None and hasattr(cfg, "image_limits"):  # gradio decoded it; the resize is still ahead
                cfg.image_limits().check_size(attach.width, attach.height, model.processor.image_processor)
            with prompt_lock:
                stream = stream_chat(model, attach, message, state.get("history"), template=template, system=system,
                                     engine=batcher, **gen)
            text = ""
            for delta in stream:
                text += delta
                chatbot[-1] = {"role": "assistant", "content": text}
                yield chatbot, state, ""
        except Exception as exc:  # shown in the page, traceback in the server log
            log.error("web UI chat turn failed", exc_info=exc)
            chatbot[-1] = {"role": "assistant", "content": f"[error: {exc}]"}
            yield chatbot, state, ""
            return
        state["history"] = stream.history
        if attach is not None:
            state["image_sent"] = True
        chatbot[-1] = {"role": "assistant", "content": stream.reply}
        yield chatbot, state, ""

    def reset():
        return [], {}, ""

    with gr.Blocks(title=f"mmkit - {name}", analytics_enabled=False) as demo:
        gr.Markdown(f"### mmkit chat - `{name}`\nUpload an image, then ask about it. A new image starts a new "
                    "conversation.")
        state = gr.State({})
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image", elem_id="mmkit-image", sources=["upload", "clipboard"],
                                 height=260)
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="mmkit-temperature")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="mmkit-top-p")
                max_tokens = gr.Slider(1, limit, value=min(256, limit), step=1, label="Max new tokens",
                                       elem_id="mmkit-max-tokens")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="mmkit-chatbot", height=420)
                text = gr.Textbox(label="Message", placeholder="Ask about the image...", elem_id="mmkit-input",
                                  lines=1)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="mmkit-send")
                    clear = gr.Button("New conversation", elem_id="mmkit-clear")
        inputs = [text, image, state, chatbot, temperature, top_p, max_tokens]
        outputs = [chatbot, state, text]
        send.click(respond, inputs, outputs, api_name=False)
        text.submit(respond, inputs, outputs, api_name=False)
        clear.click(reset, None, outputs, api_name=False)
        image.change(reset, None, outputs, api_name=False)
    concurrency = getattr(cfg, "concurrency", 1) or 1
    demo.queue(default_concurrency_limit=concurrency, max_size=getattr(cfg, "queue_size", None) or None)
    return demo


def mount_ui(app, model, cfg=None, engine=None, path: str = UI_PATH):
    """Mount the chat page on a FastAPI app at ``path`` (and redirect ``/`` to it)."""
    import gradio as gr  # optional and slow to import: only when the UI is mounted

    demo = build_ui(model, cfg, engine)

    @app.get("/", include_in_schema=False)
    async def _root():
        return RedirectResponse(url=path + "/")

    return gr.mount_gradio_app(app, demo, path=path, ssr_mode=False, mcp_server=False, theme=_theme(gr),
                               footer_links=[], show_error=True)
