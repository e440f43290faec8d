"""Student-model converters: original LLaVA-layout checkpoints (LLaVA-Med-1.5, HuatuoGPT-Vision) ->
transformers ``LlavaForConditionalGeneration`` folders, and the ``medalign-data`` command line."""
