"""Hub errors that say what to do, and a reachability check that honours proxies.

No network: the hub's answers are raised by monkeypatched loaders, and the proxy is
a server on the loopback interface."""

import http.server
import threading
import types

import pytest

from tokcom_jax.data import hub, sources, tokenizer
from tokcom_jax.errors import DataError


CODELLAMA = 'meta-llama/CodeLlama-7b-hf'
PROXY_VARIABLES = ('http_proxy', 'https_proxy', 'all_proxy', 'no_proxy')


def hub_answer(error_type, status: int, message: str = 'refused'):
  """An error as huggingface_hub raises it for an HTTP answer of `status`."""
  response = types.SimpleNamespace(status_code=status, headers={}, request=None)
  return error_type(message, response=response)


def raised_by_transformers(cause: Exception) -> OSError:
  """transformers wraps the hub's error in an OSError (`raise OSError(…) from e`)."""
  try:
    raise OSError('You are trying to access a gated repo.') from cause
  except OSError as e:
    return e


@pytest.fixture
def hub_up(monkeypatch):
  """The reachability check says yes (tokenizer.py imports it by name)."""
  for module in (hub, tokenizer):
    monkeypatch.setattr(module, 'hub_reachable', lambda: True)


def load_tokenizer_error(monkeypatch, error: Exception) -> str:
  from transformers import AutoTokenizer

  def refuse(*args, **kwargs):
    raise error
  monkeypatch.setattr(AutoTokenizer, 'from_pretrained', refuse)
  with pytest.raises(DataError) as info:
    tokenizer.load_tokenizer(CODELLAMA)
  return str(info.value)


@pytest.mark.parametrize('status, error_name', [
    (401, 'GatedRepoError'), (403, 'GatedRepoError'),
    (401, 'RepositoryNotFoundError'), (403, 'HfHubHTTPError')])
def test_a_gated_or_unauthorised_tokenizer_says_log_in_and_accept_the_licence(
    monkeypatch, hub_up, status, error_name):
  from huggingface_hub import errors
  cause = hub_answer(getattr(errors, error_name), status)
  message = load_tokenizer_error(monkeypatch, raised_by_transformers(cause))
  assert '\n' not in message
  assert message.startswith(f"cannot load tokenizer '{CODELLAMA}' (OSError): the hub"
                            ' refused it, so it is gated or private')
  assert f'accept its licence at https://huggingface.co/{CODELLAMA}' in message
  assert '`hf auth login`' in message and '`huggingface-cli login`' in message
  assert '`--config configs/tiny.py:all`' in message


def test_an_unreachable_hub_names_the_proxy_setting_and_the_offline_config(
    monkeypatch):
  for module in (hub, tokenizer):
    monkeypatch.setattr(module, 'hub_reachable', lambda: False)
  message = load_tokenizer_error(monkeypatch, OSError("We couldn't connect"))
  assert '\n' not in message and 'refused' not in message
  assert 'the hub (https://huggingface.co) cannot be reached' in message
  assert 'set HTTPS_PROXY' in message and '`--config configs/tiny.py:all`' in message


def test_another_hub_failure_points_to_verbose_and_offline(monkeypatch, hub_up):
  message = load_tokenizer_error(monkeypatch, ValueError('a broken tokenizer file'))
  assert message == (f"cannot load tokenizer '{CODELLAMA}' (ValueError): --verbose"
                     f' shows why; {hub.OFFLINE_HINT}')
  assert '`--config configs/tiny.py:all`' in hub.OFFLINE_HINT


def test_a_gated_dataset_says_log_in_and_names_its_page(monkeypatch, hub_up):
  import datasets

  def refuse(*args, **kwargs):  # what datasets raises, with the hub's error dropped
    raise datasets.exceptions.DatasetNotFoundError(
        "Dataset 'org/gated' is a gated dataset on the Hub. You must be authenticated"
        ' to access it.')
  monkeypatch.setattr(datasets, 'load_dataset', refuse)
  with pytest.raises(DataError) as info:
    list(sources.iter_documents('hf:org/gated', 'train'))
  message = str(info.value)
  assert message.startswith("cannot load dataset 'org/gated' (DatasetNotFoundError):"
                            ' the hub refused it')
  assert 'https://huggingface.co/datasets/org/gated' in message
  assert '`hf auth login`' in message


# ----- the reachability check goes through the proxy the environment names


class Proxy(http.server.BaseHTTPRequestHandler):
  """Records each request; answers plain-HTTP requests, refuses HTTPS tunnels."""

  def do_HEAD(self):
    self.server.seen.append(f'HEAD {self.path}')
    self.send_response(200)
    self.end_headers()

  def do_CONNECT(self):
    self.server.seen.append(f'CONNECT {self.path}')
    self.send_response(403)
    self.end_headers()

  def log_message(self, *args):
    pass


@pytest.fixture
def proxy(monkeypatch):
  """(proxy URL, requests it saw); no other proxy setting is left in the environment."""
  for name in PROXY_VARIABLES:
    monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(name.upper(), raising=False)
  for name in ('HF_HUB_OFFLINE', 'HF_ENDPOINT'):
    monkeypatch.delenv(name, raising=False)
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Proxy)
  server.seen = []
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  hub.hub_reachable.cache_clear()
  yield f'http://127.0.0.1:{server.server_address[1]}', server.seen
  hub.hub_reachable.cache_clear()
  server.shutdown()
  server.server_close()


def test_the_hub_check_asks_through_https_proxy(monkeypatch, proxy):
  url, seen = proxy
  monkeypatch.setenv('HTTPS_PROXY', url)
  assert hub.hub_reachable() is False  # this proxy refuses the tunnel
  assert seen == ['CONNECT huggingface.co:443']


def test_the_hub_check_says_yes_when_the_proxy_answers(monkeypatch, proxy):
  url, seen = proxy
  monkeypatch.setenv('HTTP_PROXY', url)
  monkeypatch.setenv('HF_ENDPOINT', 'http://hub.invalid')  # resolvable only by a proxy
  assert hub.hub_reachable() is True
  assert seen == ['HEAD http://hub.invalid']


def test_hf_hub_offline_skips_the_check(monkeypatch, proxy):
  url, seen = proxy
  monkeypatch.setenv('HTTPS_PROXY', url)
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  assert hub.hub_reachable() is False and seen == []
