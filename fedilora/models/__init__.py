"""Foundation encoders, the multimodal classifier and PEFT adapter slots."""
