"""What the commands and the runner use besides training: pushing to the Hub (`hub`), the run report (`report`),
the chat session (`chat`), GGUF conversion through llama.cpp (`gguf`, `gguf_convert`) and the generated recipe
reference (`docs_gen`). Nothing runs at import.
"""
