"""The browser chat demo (Gradio) that collects thumbs, corrections and preferences; it arrives with its issue."""
