"""--stats placeholder"""
def stats(config, tokenizer=None):
    raise NotImplementedError
def stats_dict(config, tokenizer=None):
    raise NotImplementedError
