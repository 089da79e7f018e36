"""Several broker URLs (the nodes of one cluster): parsing, the rotation of connection
attempts, the command line, and the password never shown. No broker: nodes that answer are
in tests/broker/test_nodes.py and tests/nodes/test_cluster_nodes.py."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import pytest

from crew import BrokerSettings, Client, ConnectionLostError
from crew.cli import broker_from_options, build_parser
from crew.connecting import Nodes
from crew.serving import Worker
from crew.worker import serve
from tests.support.connect import refused_port

NO_ENV: dict[str, str] = {}
SECRET = "hunter2-secret"
URLS = "amqp://app:pw@n1:5701/crew,amqp://app:pw@n2:5702/crew,amqp://app:pw@n3/crew"


# --- parsing ---------------------------------------------------------------------------


def test_commas_give_every_node_in_order_and_the_first_as_host_and_port():
    s = BrokerSettings.from_url(URLS, environ=NO_ENV)
    assert s.nodes == (("n1", 5701), ("n2", 5702), ("n3", 5672))
    assert (s.host, s.port, s.vhost, s.user, s.password) == ("n1", 5701, "crew", "app", "pw")


def test_spaces_around_commas_and_a_list_mean_the_same():
    spaced = BrokerSettings.from_url("  amqp://h1:1/v , amqp://h2:2/v  ", environ=NO_ENV)
    listed = BrokerSettings.from_url(["amqp://h1:1/v", " amqp://h2:2/v"], environ=NO_ENV)
    assert spaced == listed
    assert spaced.nodes == (("h1", 1), ("h2", 2))


def test_a_tuple_of_one_url_is_one_node():
    s = BrokerSettings.from_url(("amqp://h:7/",), environ=NO_ENV)
    assert (s.host, s.port, s.nodes) == ("h", 7, (("h", 7),))


def test_duplicates_are_dropped_keeping_the_first_place():
    s = BrokerSettings.from_url("amqp://h1,amqp://h2,amqp://h1:5672/,amqp://h2:5673",
                                environ=NO_ENV)
    assert s.nodes == (("h1", 5672), ("h2", 5672), ("h2", 5673))
    one = BrokerSettings.from_url("amqp://h,amqp://h:5672", environ=NO_ENV)
    assert one.nodes == (("h", 5672),)


def test_one_url_is_one_node_as_before():
    s = BrokerSettings.from_url("amqp://alice:pw@h:5673/v", environ=NO_ENV)
    assert s.nodes == (("h", 5673),)
    assert s.node(0) is s and s.node(5) is s
    assert s.safe_urls == s.safe_url == "amqp://alice:***@h:5673/v"


def test_a_comma_inside_a_password_does_not_split():
    s = BrokerSettings.from_url("amqp://u:pa,ss@h/,amqp://u:pa,ss@h2/", environ=NO_ENV)
    assert s.password == "pa,ss" and s.nodes == (("h", 5672), ("h2", 5672))


@pytest.mark.parametrize("urls, words", [
    ("amqp://a@h1/v,amqp://b@h2/v", "user: URL 1 'a', URL 2 'b'"),
    ("amqp://a@h1/v,amqp://h2/v", "user: URL 1 'a', URL 2 none (default 'guest')"),
    ("amqp://h1/v,amqp://h2/w", "virtual host: URL 1 'v', URL 2 'w'"),
    ("amqp://h1/v,amqp://h2/v,amqp://h3/", "virtual host: URL 1 'v', URL 3 '/'"),
    ("amqp://h1,amqps://h2", "scheme (amqp or amqps): URL 1 amqp, URL 2 amqps"),
    ("amqp://h1/?heartbeat=5,amqp://h2/", "heartbeat: URL 1 5, URL 2 none (default 10)"),
    (f"amqp://u:{SECRET}@h1,amqp://u:other@h2", "password: URL 2 gives another one"),
    (f"amqp://u:{SECRET}@h1,amqp://u@h2", "password: URL 1 gives one, URL 2 none"),
])
def test_urls_that_disagree_on_more_than_the_address_are_refused(urls, words):
    with pytest.raises(ValueError, match="the broker URLs disagree on the") as caught:
        BrokerSettings.from_url(urls, environ=NO_ENV)
    assert words in str(caught.value) and SECRET not in str(caught.value)


def test_no_user_means_guest_in_every_url():
    s = BrokerSettings.from_url("amqp://guest@h1,amqp://h2", environ=NO_ENV)
    assert s.user == "guest" and len(s.nodes) == 2


@pytest.mark.parametrize("urls", ["amqp://h1,h2", "amqp://h1,", "amqp://h1, h2:5672"])
def test_a_node_without_its_own_scheme_is_refused(urls):
    with pytest.raises(ValueError, match="must each start with amqp:// or amqps://"):
        BrokerSettings.from_url(urls, environ=NO_ENV)


@pytest.mark.parametrize("urls", [[""], ["amqp://h", ""], ["amqp://h", None]])
def test_empty_items_in_a_list_are_refused(urls):
    with pytest.raises(ValueError, match="non-empty strings"):
        BrokerSettings.from_url(urls, environ=NO_ENV)


def test_crew_url_with_several_urls_and_crew_password_for_all():
    env = {"CREW_URL": "amqp://app@n1/crew, amqp://app@n2/crew", "CREW_PASSWORD": SECRET}
    s = BrokerSettings.from_url(environ=env)
    assert s.nodes == (("n1", 5672), ("n2", 5672)) and s.password == SECRET
    assert all(s.node(i).password == SECRET for i in range(2))


def test_host_and_port_overrides_are_refused_with_several_urls():
    for override in ({"host": "x"}, {"port": 1}):
        with pytest.raises(ValueError, match="picks one node"):
            BrokerSettings.from_url(URLS, environ=NO_ENV, **override)


def test_other_overrides_apply_to_every_node():
    s = BrokerSettings.from_url(URLS, environ=NO_ENV, vhost="other", user="bob", password="x",
                                host=None, port=None)
    for i in range(3):
        node = s.node(i)
        assert (node.vhost, node.user, node.password) == ("other", "bob", "x")


def test_tls_override_moves_only_the_ports_not_given():
    s = BrokerSettings.from_url("amqp://h1,amqp://h2:5999", environ=NO_ENV, tls=True)
    assert s.tls and s.nodes == (("h1", 5671), ("h2", 5999))


def test_node_gives_the_settings_of_one_node_keeping_all_nodes():
    s = BrokerSettings.from_url(URLS, environ=NO_ENV)
    second = s.node(1)
    assert (second.host, second.port, second.nodes) == ("n2", 5702, s.nodes)
    assert second.pika_parameters().host == "n2" and second.pika_parameters().port == 5702
    assert s.node(3) is s  # modulo the number of nodes
    assert second.safe_url == "amqp://app:***@n2:5702/crew"


def test_host_and_port_must_be_one_of_several_nodes():
    with pytest.raises(ValueError, match="must be one of the nodes"):
        BrokerSettings(host="elsewhere", nodes=(("a", 1), ("b", 2)))
    # With fewer than two nodes, host and port are the node (dataclasses.replace as before).
    s = dataclasses.replace(BrokerSettings.from_url("amqp://h", environ=NO_ENV), host="g")
    assert s.nodes == (("g", 5672),)


def test_given_takes_settings_as_they_are_and_urls_parsed():
    s = BrokerSettings.from_url(URLS, environ=NO_ENV)
    assert BrokerSettings.given(s) is s
    assert BrokerSettings.given(["amqp://h1", "amqp://h2"]).nodes == (
        ("h1", 5672), ("h2", 5672))


def test_the_password_shows_in_no_repr_and_no_safe_url():
    s = BrokerSettings.from_url(f"amqp://u:{SECRET}@h1/v,amqp://u:{SECRET}@h2/v",
                                environ=NO_ENV)
    for shown in (repr(s), str(s), s.safe_url, s.safe_urls, repr(s.node(1)),
                  s.node(1).safe_url, repr(Nodes(s).next())):
        assert SECRET not in shown
    assert s.safe_urls == "amqp://u:***@h1:5672/v,amqp://u:***@h2:5672/v"


# --- the rotation ----------------------------------------------------------------------


def test_attempts_go_round_the_nodes_from_the_start_given():
    s = BrokerSettings.from_url(URLS, environ=NO_ENV)
    nodes = Nodes(s, start=1)
    assert [nodes.next().host for _ in range(5)] == ["n2", "n3", "n1", "n2", "n3"]


def test_the_first_node_is_chosen_at_random_so_clients_spread():
    s = BrokerSettings.from_url(URLS, environ=NO_ENV)
    firsts = Counter(Nodes(s).next().host for _ in range(300))
    assert set(firsts) == {"n1", "n2", "n3"}
    assert min(firsts.values()) > 50  # about 100 each


def test_one_node_is_every_attempt_and_the_same_settings_object():
    s = BrokerSettings.from_url("amqp://h:1/", environ=NO_ENV)
    nodes = Nodes(s)
    assert all(nodes.next() is s for _ in range(3))


# --- the command line ------------------------------------------------------------------


def test_cli_url_with_several_nodes():
    options = build_parser().parse_args(["--url", URLS, "--vhost", "v2"])
    s = broker_from_options(options, "crew-worker")
    assert s.nodes == (("n1", 5701), ("n2", 5702), ("n3", 5672))
    assert (s.vhost, s.name) == ("v2", "crew-worker")


@pytest.mark.parametrize("flags", [["-H", "x"], ["--host", "x"], ["-P", "5"], ["--port", "5"]])
def test_cli_host_or_port_with_several_urls_is_a_usage_error(flags, caplog):
    options = build_parser().parse_args(["--url", URLS, *flags])
    with pytest.raises(ValueError, match="picks one node"):
        broker_from_options(options, "crew-worker")
    assert serve({"t": lambda: None}, {}, options) == 2  # the worker says why and exits
    assert any("picks one node" in r.getMessage() for r in caplog.records)


def test_cli_help_explains_several_urls():
    text = build_parser().format_help()
    assert "separated by commas" in " ".join(text.split())
    assert "refused with several URLs" in " ".join(text.split())


# --- connection attempts where nothing answers: each goes to the next node -------------


def _urls(ports: list[int]) -> str:
    return ",".join(f"amqp://u:{SECRET}@127.0.0.1:{port}/v" for port in ports)


@pytest.mark.gen_test(timeout=30)
async def test_client_attempts_take_every_node_in_turn_and_never_log_the_password(caplog):
    caplog.set_level(logging.DEBUG)
    ports = [refused_port(), refused_port()]
    client = Client(_urls(ports))
    with pytest.raises(ConnectionLostError) as caught:
        await client.connect(timeout=2.5)
    await client.close()
    assert SECRET not in str(caught.value)
    tried = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert len(tried) >= 3
    for port in ports:  # alternately, whichever came first
        assert any(f"127.0.0.1:{port}/v" in line for line in tried), tried
    assert all(SECRET not in r.getMessage() for r in caplog.records)


@pytest.mark.gen_test(timeout=30)
async def test_worker_attempts_take_every_node_in_turn_and_never_log_the_password(caplog):
    caplog.set_level(logging.DEBUG)
    ports = [refused_port(), refused_port(), refused_port()]
    worker = Worker({"t": lambda: None}, broker=[
        f"amqp://u:{SECRET}@127.0.0.1:{port}/v" for port in ports])
    with pytest.raises(ConnectionLostError):
        await worker.start(timeout=3.5)
    tried = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    attempts = [next(p for p in ports if f":{p}/" in line) for line in tried]
    assert len(attempts) >= 3
    # Round robin: three attempts in a row never go to the same node twice.
    assert len(set(attempts[:3])) == 3, attempts
    assert all(SECRET not in r.getMessage() for r in caplog.records)
