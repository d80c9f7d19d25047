"""DeepSeek-V4 model (placeholder: being written)."""


def load_model(*args, **kwargs):
    raise NotImplementedError
