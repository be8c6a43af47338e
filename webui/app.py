"""The WebUI: a Gradio multimodal chat that talks to the gateway (OpenAI API) with one key.

    qwen3vl-webui --gateway http://localhost:9000/v1 --key qv-... [--port 7860]

Upload an image, ask, read the answer as it streams, ask a follow-up. Presets fill the question
for the seed's use cases; the HTML preset also renders the page the model writes.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import re
import sys
from pathlib import Path

import gradio as gr
from openai import OpenAI

MODEL = "qwen3-vl-2b-instruct"
PRESETS = {
    "OCR: extract the text": "Extract all text in this image. Keep its layout; render tables as Markdown tables.",
    "GUI: elements and actions": (
        "List the interactive elements of this screenshot (buttons, fields, links, menus) with their labels "
        "and positions, then suggest the next action a user would take."
    ),
    "HTML/CSS from a screenshot": (
        "Write one self-contained HTML page (inline CSS) that reproduces this screenshot. Answer with the code only, "
        "in a ```html block."
    ),
}
HTML_BLOCK = re.compile(r"```html\s*(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def to_openai(history: list[dict]) -> list[dict]:
    """Gradio's chat history (messages; an uploaded image is its own user message) as OpenAI
    messages: consecutive user entries merge into one turn of parts, images first."""
    messages: list[dict] = []
    for entry in history:
        content = entry["content"]
        if entry["role"] == "assistant":
            messages.append({"role": "assistant", "content": str(content)})
            continue
        if isinstance(content, dict) or isinstance(content, (tuple, list)):  # a file: {"path": ...} or (path,)
            path = content["path"] if isinstance(content, dict) else content[0]
            part = {"type": "image_url", "image_url": {"url": data_url(path)}}
        else:
            part = {"type": "text", "text": str(content)}
        if messages and messages[-1]["role"] == "user":
            messages[-1]["content"].append(part)
        else:
            messages.append({"role": "user", "content": [part]})
    for message in messages:  # the endpoint's chat template wants images before the text of a turn
        if message["role"] == "user":
            message["content"].sort(key=lambda p: p["type"] != "image_url")
    return messages


def html_preview(answer: str) -> str:
    """The page an HTML answer describes, in a sandboxed frame (its scripts do not run)."""
    found = HTML_BLOCK.search(answer)
    if not found:
        return ""
    page = found.group(1).replace("&", "&amp;").replace('"', "&quot;")
    return f'<iframe sandbox srcdoc="{page}" style="width:100%;height:480px;border:1px solid #ccc"></iframe>'


def build(gateway_url: str, key: str, max_tokens: int = 512) -> gr.Blocks:
    client = OpenAI(base_url=gateway_url, api_key=key, max_retries=0)

    def add_message(history: list, message: dict):
        for path in message.get("files", []):
            history.append({"role": "user", "content": {"path": path}})
        if message.get("text"):
            history.append({"role": "user", "content": message["text"]})
        return history, gr.MultimodalTextbox(value=None, interactive=False)

    def answer(history: list):
        history.append({"role": "assistant", "content": ""})
        try:
            stream = client.chat.completions.create(
                model=MODEL, messages=to_openai(history[:-1]), stream=True, max_tokens=max_tokens
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    history[-1]["content"] += chunk.choices[0].delta.content
                    yield history, html_preview(history[-1]["content"])
        except Exception as exc:  # the gateway's message (401, 429, 400 ...) shown in the chat
            history[-1]["content"] += f"\n\n[error: {exc}]"
        yield history, html_preview(history[-1]["content"])

    with gr.Blocks(title="Qwen3-VL") as page:
        gr.Markdown("## Qwen3-VL: ask about an image")
        chatbot = gr.Chatbot(type="messages", elem_id="chat", height=480)
        with gr.Row():
            presets = [gr.Button(name, size="sm", elem_classes="preset") for name in PRESETS]
        box = gr.MultimodalTextbox(
            file_types=["image"], placeholder="Ask something, attach an image", elem_id="ask", show_label=False
        )
        preview = gr.HTML(elem_id="preview")
        for button, prompt in zip(presets, PRESETS.values()):
            button.click(lambda prompt=prompt: {"text": prompt, "files": []}, outputs=box)
        sent = box.submit(add_message, [chatbot, box], [chatbot, box])
        sent.then(answer, chatbot, [chatbot, preview]).then(lambda: gr.MultimodalTextbox(interactive=True), None, box)
    return page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwen3vl-webui", description=__doc__.split("\n\n")[0])
    p.add_argument("--gateway", default="http://localhost:9000/v1", help="the gateway's OpenAI base URL")
    p.add_argument("--key", required=True, help="an API key made by gateway-keys")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    build(args.gateway, args.key).launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
