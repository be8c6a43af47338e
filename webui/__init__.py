"""A Gradio chat page for the gateway: image upload, multi-turn, streamed answers, task presets."""
