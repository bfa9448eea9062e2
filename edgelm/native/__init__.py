"""Process-wide set-up of the native libraries edgelm drives (imported only where they are used).

``llamacpp``: llama.cpp through llama-cpp-python's bindings: log routing, backend initialisation and the build's
facts.  Both the llama.cpp runtime and the GGUF quantizer use it, so neither imports the other.
"""
