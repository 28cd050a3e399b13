# placeholder: being written (issue 2)
def attention(*args, **kwargs):
    raise NotImplementedError


def scaled_dot_product_attention(*args, **kwargs):
    raise NotImplementedError


class AttentionFunction:
    pass
