"""The browser chat demo (Gradio): chat with an image, rate and correct answers, compare two versions side by side,
and see the versions the trainer published. It reaches the gateway over HTTP only, through `alignloop.client`;
`alignloop up` mounts it at `/` on the gateway's port and `alignloop demo --gateway-url URL` runs it alone.
"""
