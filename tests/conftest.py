import os

# Must be set before triton is first imported: kernel tests run in the Triton interpreter on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
