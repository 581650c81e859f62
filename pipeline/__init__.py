"""r1-distill: generate reasoning traces with a vLLM teacher, fine-tune students, score them."""
