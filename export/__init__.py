"""Offline side: a torch GPT (GPT-2 and Llama families) becomes a verified ONNX bundle."""
