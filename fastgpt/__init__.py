"""fastgpt: the GPT of "Let's build GPT" and nanoGPT with Triton kernels on its hot paths (README.md).

A regular package, so that no other distribution's `fastgpt` can merge into it as a namespace; its ops are
the subpackage `fastgpt.kernels`, whose files live in the repository's top-level kernels/ folder.
"""
