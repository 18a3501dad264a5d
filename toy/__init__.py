"""The embedded default fixtures, made by the project's own code (nothing is downloaded):

  toy.world    a fictional world of facts -> the default samples
  toy.teacher  a small Llama trained on it -> the default text teacher (data/models/teacher)
  toy.encoder  a speech encoder pretrained with phoneme CTC on pseudo-names -> data/models/encoder

They stand in for a real dataset, a real LLM and Whisper; the pipeline's stages and the student take
a Hugging Face dataset / model id in their place on a real machine.
"""

from pipeline import cpu_isa as _cpu_isa  # first: the CPU instruction set is pinned before torch loads

_cpu_isa.pin()
