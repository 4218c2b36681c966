"""Reading and writing what qtools works on: model directories, safetensors,
adapters, suites, and outputs written atomically."""
