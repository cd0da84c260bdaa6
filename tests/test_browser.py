"""The watch page in a real browser: headless Chromium opens ``tokenbus serve``'s page, enqueues a
joke_poem job, and the joke and poem columns it fills in live are compared with the model's texts,
also across a gateway killed and restarted mid-stream (EventSource resumes by Last-Event-ID) and a
job that starts over on another worker (the page drops the older attempt's text).

Everything is real: a private redis-server, the paced offline model over HTTP, a ``tokenbus
worker`` and ``tokenbus serve`` as subprocesses. Screenshots of the filled page stay in
``tests/artifacts/`` (the path is printed).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from redis.asyncio import Redis
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.select import Select

from tests.browser import console
from tests.conftest import make_settings
from tests.sse import free_port
from tests.support import Process, ThreadedModelServer, start_gateway, start_worker, wait_for, wait_until
from tokenbus.consumer.jobs import job_result
from tokenbus.redis_server import RedisServerProcess
from tokenbus.worker.offline_model import Fault, script_for
from tokenbus.worker.settings import Settings

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).parent / "artifacts"
FINAL = ("end", "error", "cancelled", "refused")
API_KEY = "browser-test-key"


def texts_for(topic: str) -> dict[str, str]:
    """What the offline model answers the joke_poem graph's two prompts about ``topic`` with."""
    return {
        "joke": script_for(f"Write a joke about {topic}"),
        "poem": script_for(f"Write a short poem about {topic}"),
    }


@dataclass
class Gateway:
    """``tokenbus serve`` on a fixed port, so that it can be killed and started again at the same URL."""

    settings: Settings
    port: int
    api_keys: str = ""
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        env = {"TOKENBUS_GATEWAY_API_KEYS": self.api_keys} if self.api_keys else {}
        self.process = await start_gateway(self.settings, self.port, **env)

    async def kill(self) -> None:
        assert self.process is not None
        await self.process.stop(signal.SIGKILL)

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()


@contextlib.asynccontextmanager
async def run_stack(settings: Settings, api_keys: str = "") -> AsyncIterator[Gateway]:
    worker = await start_worker(settings)
    gateway = Gateway(settings, free_port(), api_keys)
    try:
        await gateway.start()
        yield gateway
    finally:
        await gateway.stop()
        await worker.stop()


@pytest.fixture
async def gateway(
    redis_server: RedisServerProcess, paced_model: ThreadedModelServer, prefix: str
) -> AsyncIterator[Gateway]:
    """A worker and a gateway (no API key: loopback only) over the paced model."""
    async with run_stack(make_settings(redis_server.url, paced_model.base_url, prefix)) as gateway:
        yield gateway


async def job_ended(redis: Redis, settings: Settings) -> bool:
    """Whether the test's one job has ended (its job stream holds an ``end``)."""
    async for key in redis.scan_iter(match=f"{settings.prefix}:job:*"):
        if any(fields[b"type"] == b"end" for _, fields in await redis.xrevrange(key, count=1)):
            return True
    return False


# -- the page, through selenium -------------------------------------------------------------------
def text(driver: WebDriver, selector: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, selector).get_attribute("textContent"))


def attribute(driver: WebDriver, selector: str, name: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, selector).get_attribute(name))


def column(driver: WebDriver, tag: str) -> str:
    return text(driver, f'[data-tag="{tag}"]')


async def open_page(driver: WebDriver, url: str) -> None:
    driver.get(url)
    await wait_until(lambda: attribute(driver, "body", "data-ready") == "", what="the page to read /config")


async def enqueue(driver: WebDriver, topic: str) -> None:
    box = driver.find_element(By.ID, "topic")
    box.clear()
    box.send_keys(topic)
    driver.find_element(By.ID, "go").click()


async def watch(driver: WebDriver, kind: str, target: str) -> None:
    Select(driver.find_element(By.ID, "watch-kind")).select_by_value(kind)
    box = driver.find_element(By.ID, "watch-target")
    box.clear()
    box.send_keys(target)
    driver.find_element(By.ID, "watch-go").click()


async def wait_final(driver: WebDriver, *, within: float = 60.0) -> str:
    def final() -> str | None:
        state = attribute(driver, "#status", "data-state")
        return state if state in FINAL else None

    try:
        return await wait_until(final, within=within, what="the page to show the job's end")
    except AssertionError:
        raise AssertionError(f"status {text(driver, '#status')!r}; page console:\n{console(driver)}") from None


def gone(element: WebElement) -> bool:
    """Whether ``element`` has left the page (the page replaced what it showed)."""
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    return False


def screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), f"chromium could not save {path}"
    print(f"screenshot of the watch page: {path}")
    return path


def assert_shown_exactly(driver: WebDriver, topic: str) -> None:
    assert {tag: column(driver, tag) for tag in ("joke", "poem")} == texts_for(topic)
    assert attribute(driver, "#connection", "data-duplicates") == "0", "the stream repeated entries"
    assert text(driver, "#notices") == "", "the page reported a gap or a failure"


# -- tests ----------------------------------------------------------------------------------------
async def test_the_page_shows_the_joke_and_the_poem_as_the_model_wrote_them(
    browser: WebDriver, gateway: Gateway, redis: Redis
) -> None:
    await open_page(browser, gateway.url)
    assert not browser.find_element(By.ID, "api-key").is_displayed(), "no key is asked of a loopback-only gateway"
    await enqueue(browser, "owls")

    assert await wait_final(browser) == "end"
    assert_shown_exactly(browser, "owls")
    job = await job_result(redis, text(browser, "#job-id"), prefix=gateway.settings.prefix)
    assert job.texts == texts_for("owls")  # the job the page enqueued, as its stream holds it
    first = browser.find_element(By.CSS_SELECTOR, '[data-tag="joke"] .tok')
    hover = str(first.get_attribute("title"))
    assert "node: call_model" in hover and "step: 1" in hover
    assert f"model: {gateway.settings.model}" in hover
    screenshot(browser, "watch-page.png")


async def test_the_page_shows_any_job_by_its_id_tags_live_and_a_failed_job(
    browser: WebDriver, gateway: Gateway
) -> None:
    await open_page(browser, gateway.url)
    await enqueue(browser, "owls")
    assert await wait_final(browser) == "end"
    job_id = text(browser, "#job-id")
    first = browser.find_element(By.CSS_SELECTOR, '[data-tag="joke"] .tok')

    # a finished job by its id: replayed from its stream, the same texts again
    await watch(browser, "job", job_id)
    await wait_until(lambda: gone(first), what="the view to start over")
    assert await wait_final(browser) == "end"
    assert text(browser, "#job-id") == job_id
    assert_shown_exactly(browser, "owls")

    # tags, live from now: a job enqueued by someone else shows up in their columns
    await watch(browser, "tag", "joke,poem")
    await wait_until(lambda: attribute(browser, "#connection", "data-state") == "live", what="the tag stream")
    assert column(browser, "joke") == column(browser, "poem") == ""
    async with httpx2.AsyncClient() as http:
        request = {"graph": "joke_poem", "input": {"topic": "herons"}, "modes": ["messages", "updates", "values"]}
        response = await http.post(f"{gateway.url}jobs", json=request)
        assert response.status_code == 201, response.text
    expected = texts_for("herons")
    await wait_until(lambda: column(browser, "poem") == expected["poem"], what="the poem in the tag view")
    assert column(browser, "joke") == expected["joke"]

    # a job that also publishes its state (update and values events): the page shows its tokens alone
    await watch(browser, "job", response.json()["job_id"])
    assert await wait_final(browser) == "end"
    assert_shown_exactly(browser, "herons")

    # a job that fails: the page shows the `error` entry as the job's end, not as a lost connection
    await enqueue(browser, "explode-error")
    assert await wait_final(browser) == "error"
    assert "scripted failure mid-stream" in text(browser, "#status")
    assert attribute(browser, "#connection", "data-state") == "closed"


async def test_the_page_carries_on_when_the_gateway_is_restarted_mid_stream(
    browser: WebDriver, redis_server: RedisServerProcess, redis: Redis, prefix: str
) -> None:
    """The gateway is killed mid-poem (the model holds the poem after 10 tokens until then: a pace
    alone is no guarantee on a starved machine); the rest of the poem is written while it is down,
    and the page, reconnecting to the restarted gateway, shows each token once."""
    topic = "cats"
    poem = texts_for(topic)["poem"]
    model = ThreadedModelServer(faults=[Fault(f"poem about {topic}", "hold", after=10)]).start()
    settings = make_settings(redis_server.url, model.base_url, prefix)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(model.stop)
        gateway = await stack.enter_async_context(run_stack(settings))
        await open_page(browser, gateway.url)
        await enqueue(browser, topic)
        await wait_until(lambda: len(column(browser, "poem")) > 0, within=60, what="the page to show the poem's start")

        await gateway.kill()
        shown = column(browser, "poem")  # all the page can have: its gateway is gone
        assert poem.startswith(shown) and shown != poem, shown
        await wait_until(
            lambda: attribute(browser, "#connection", "data-state") == "reconnecting",
            what="the page to notice the lost connection",
        )
        model.release()  # the rest of the poem, and the job's end, written while the gateway is down
        await wait_for(lambda: job_ended(redis, settings), within=60, what="the job to end")
        await gateway.start()

        assert await wait_final(browser) == "end"
        assert_shown_exactly(browser, topic)
        assert int(attribute(browser, "#connection", "data-opens")) >= 2, "the page did not reconnect"
        screenshot(browser, "watch-page-restarted.png")


async def test_the_page_starts_over_when_a_newer_attempt_of_the_job_begins(
    browser: WebDriver, redis_server: RedisServerProcess, redis: Redis, prefix: str
) -> None:
    """A worker stopped without grace mid-poem: attempt 1 ends with ``retry``, another worker runs
    attempt 2 from the start, and the page drops attempt 1's text on the ``restart`` event. The
    model holds attempt 1's poem after 10 tokens until its worker has gone (a pace alone is no
    guarantee: a starved machine sends the overdue tokens at once), and streams attempt 2's whole."""
    model = ThreadedModelServer(faults=[Fault("poem about cats", "stall", after=10, times=1)]).start()
    settings = make_settings(redis_server.url, model.base_url, prefix, TOKENBUS_SHUTDOWN_GRACE=0)
    workers = [await start_worker(settings)]
    gateway = Gateway(settings, free_port())
    try:
        await gateway.start()
        await open_page(browser, gateway.url)
        await enqueue(browser, "cats")
        await wait_until(lambda: len(column(browser, "poem")) > 0, within=60, what="the page to show the poem's start")
        assert await workers[0].stop(signal.SIGTERM) == 0, workers[0].output
        assert column(browser, "poem") != texts_for("cats")["poem"], "the job ended before its worker was stopped"
        workers.append(await start_worker(settings))

        assert await wait_final(browser) == "end"
        assert {tag: column(browser, tag) for tag in ("joke", "poem")} == texts_for("cats")
        assert "attempt 1 was interrupted; attempt 2 starts over" in text(browser, "#notices")
        assert attribute(browser, "#connection", "data-duplicates") == "0"
    finally:
        await gateway.stop()
        for worker in workers:
            await worker.stop()
        model.stop()


async def test_with_api_keys_the_page_enqueues_with_the_key_and_follows_with_the_subscribe_token(
    browser: WebDriver, redis_server: RedisServerProcess, paced_model: ThreadedModelServer, prefix: str
) -> None:
    async with run_stack(make_settings(redis_server.url, paced_model.base_url, prefix), API_KEY) as gateway:
        await open_page(browser, gateway.url)
        key = browser.find_element(By.ID, "api-key")
        await wait_until(key.is_displayed, what="the API key field")

        await enqueue(browser, "foxes")
        await wait_until(lambda: text(browser, "#notices") != "", what="the page to ask for the key")
        assert attribute(browser, "#status", "data-state") == "idle"

        key.send_keys(API_KEY)
        await enqueue(browser, "foxes")
        assert await wait_final(browser) == "end"
        assert {tag: column(browser, tag) for tag in ("joke", "poem")} == texts_for("foxes")
        assert browser.execute_script("return sessionStorage.getItem('tokenbus.apiKey')") == API_KEY


async def test_the_readme_client_runs_as_written(browser: WebDriver, gateway: Gateway) -> None:
    """README's "Browser" JavaScript, verbatim, in the page's origin: its text per tag is the model's."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    snippet = readme.split("## Browser", 1)[1].split("```js\n", 1)[1].split("```", 1)[0]
    assert len(snippet.strip().splitlines()) <= 16, "the README promises a short client"
    await open_page(browser, gateway.url)
    browser.execute_script(
        "window.apiKey = ''; window.done = false;"
        "(async () => {" + snippet + "\nwindow.text = text; window.es = es;"
        "  es.addEventListener('end', () => { window.done = true; }); })();"
    )
    await wait_until(lambda: browser.execute_script("return window.done"), within=60, what="the client's job to end")
    shown = browser.execute_script("return window.text")
    assert shown == {"joke": texts_for("cats")["joke"], "poem": texts_for("cats")["poem"]}, console(browser)
    assert browser.execute_script("return window.es.readyState") == 2  # closed by the client, not reconnecting
