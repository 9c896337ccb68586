"""Reading the JSON files users hand to the tools (SubNets, traces)."""
import json


def read_json(path: str, source: str):
    """The content of ``path``; an error naming ``source`` (what the file
    should be) where it is not JSON or nests too deeply."""
    with open(path) as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f'{source} is not valid JSON: {e}') from None
        except RecursionError:
            raise ValueError(f'{source} nests too deeply') from None
