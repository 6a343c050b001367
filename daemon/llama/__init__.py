"""Everything that runs inside a llama.cpp process, and nothing else does: the engine that holds the
model (`python -m vramchat.daemon.llama.engine`), its chat model, Llama() parameters and KV state
cache, llama.cpp's RPC backend (`vramchat rpc-server`, and remote devices in the engine), the
dry run that sizes a load's buffers, and `vramchat doctor`'s probe of the build.

Only modules in this folder import llama_cpp, and the daemon starts them as processes of their
own: a native crash there never takes the daemon down (tests/test_import_hygiene.py).
"""
