"""Hand a trained model to users without this package: TorchScript, ONNX or safetensors plus a model card."""
