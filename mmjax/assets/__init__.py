"""Data files shipped with mmjax (tokenizers/shapes: the shapes world's tokenizer, see mmjax.data.tokenizer)."""
