// The tokenbus watch page: enqueue a joke_poem job, or watch a job id or tags, and show each tag's
// tokens live in a column of its own. Plain JS, no build step, nothing loaded from elsewhere.
//
// It follows a stream with EventSource, which reconnects by itself and sends Last-Event-ID: the
// gateway resumes after that entry. The page itself never shows an entry twice (it remembers each
// job's (attempt, seq) pairs), drops what it shows of a job when a newer attempt starts over, and
// reopens the stream with ?since= when EventSource gives up (an HTTP error while the gateway restarts).
"use strict";

(() => {
  // update and values (a node's output, the state after a step) are not shown, but are received
  // so that the page's resume point (?since=) stays the id of the last event
  const ENTRY_EVENTS = ["start", "token", "custom", "update", "values", "end", "error", "cancelled"];
  const TEXT = new Set(["token", "custom"]);
  const NOTICE_EVENTS = ["restart", "gap", "overflow", "gateway_error"];
  const TERMINAL = new Set(["end", "error", "cancelled"]);
  const KEY_STORAGE = "tokenbus.apiKey";
  const LAST_JOB_STORAGE = "tokenbus.lastJob";
  const NAME = /^[A-Za-z0-9._:-]{1,128}$/;
  const UNTAGGED = "";
  const MAX_RUNS = 50; // jobs shown per column; older ones leave the page

  const $ = (selector) => document.querySelector(selector);
  const ui = {
    enqueue: $("#enqueue"), topic: $("#topic"), go: $("#go"), cancel: $("#cancel"),
    watch: $("#watch"), watchKind: $("#watch-kind"), watchTarget: $("#watch-target"),
    auth: $("#auth"), apiKey: $("#api-key"),
    jobId: $("#job-id"), status: $("#status"), connection: $("#connection"),
    notices: $("#notices"), columns: $("#columns"),
  };
  const config = { auth: false };
  let current = null; // the Watch being shown

  // -- small helpers ------------------------------------------------------------------------------
  function setStatus(state, text) {
    ui.status.dataset.state = state;
    ui.status.textContent = text || state;
  }

  function setConnection(state) {
    ui.connection.dataset.state = state;
    ui.connection.textContent = state;
  }

  function notice(text, kind = "info") {
    const item = document.createElement("li");
    item.className = `notice notice-${kind}`;
    item.textContent = text;
    ui.notices.append(item);
  }

  function apiKey() {
    return config.auth ? ui.apiKey.value.trim() : "";
  }

  function headers(bearer) {
    const h = { "Content-Type": "application/json" };
    if (bearer) h.Authorization = `Bearer ${bearer}`;
    return h;
  }

  // fetch + JSON; never throws: {ok, status, body} (status 0: the gateway did not answer)
  async function api(method, path, { body, bearer } = {}) {
    try {
      const response = await fetch(path, {
        method, headers: headers(bearer), body: body === undefined ? undefined : JSON.stringify(body),
      });
      let data = null;
      try { data = await response.json(); } catch { data = null; }
      return { ok: response.ok, status: response.status, body: data };
    } catch (err) {
      return { ok: false, status: 0, body: { error: "unreachable", detail: String(err) } };
    }
  }

  function refusal(what, result) {
    const body = result.body || {};
    const why = body.detail || body.error || `HTTP ${result.status}`;
    return `${what}: ${why}`;
  }

  function describe(entry) {
    // what a token's hover shows: its node, LangGraph step and model
    const meta = entry.meta && typeof entry.meta === "object" ? entry.meta : {};
    const lines = [];
    const node = entry.node || meta.langgraph_node;
    if (node) lines.push(`node: ${node}`);
    if (meta.langgraph_step !== undefined) lines.push(`step: ${meta.langgraph_step}`);
    if (meta.ls_model_name) lines.push(`model: ${meta.ls_model_name}${meta.ls_provider ? ` (${meta.ls_provider})` : ""}`);
    lines.push(`attempt ${entry.attempt}, seq ${entry.seq}`);
    return lines.join("\n");
  }

  // -- columns ------------------------------------------------------------------------------------
  function column(tag) {
    for (const el of ui.columns.querySelectorAll(".tokens")) {
      if (el.dataset.tag === tag) return el;
    }
    const article = document.createElement("article");
    article.className = "column";
    article.dataset.added = "";
    const heading = document.createElement("h2");
    heading.id = `heading-${ui.columns.children.length}`;
    heading.textContent = tag === UNTAGGED ? "(no tag)" : tag;
    const tokens = document.createElement("div");
    tokens.className = "tokens";
    tokens.dataset.tag = tag;
    article.setAttribute("aria-labelledby", heading.id);
    article.append(heading, tokens);
    ui.columns.append(article);
    return tokens;
  }

  function clearColumns() {
    for (const article of ui.columns.querySelectorAll(".column")) {
      if ("added" in article.dataset) article.remove();
      else article.querySelector(".tokens").replaceChildren();
    }
  }

  function runsOf(job) {
    return [...ui.columns.querySelectorAll(".run")].filter((el) => el.dataset.job === job);
  }

  // the block of one job's attempt inside a tag's column (a tag view shows several jobs per column)
  function run(tag, entry) {
    const tokens = column(tag);
    for (const el of tokens.children) {
      if (el.dataset.job === entry.job) return el;
    }
    const el = document.createElement("div");
    el.className = "run";
    el.dataset.job = entry.job;
    el.dataset.attempt = String(entry.attempt);
    el.dataset.label = `job ${entry.job}`;
    tokens.append(el);
    while (tokens.children.length > MAX_RUNS) tokens.firstElementChild.remove(); // a long tag view
    return el;
  }

  // -- one followed stream ------------------------------------------------------------------------
  class Watch {
    // path: /jobs/ID/events or /tags/T/events?tag=..; job: the job id of a job view (null for tags)
    constructor({ path, job, token }) {
      this.path = path;
      this.job = job;
      this.token = token || null;
      this.cursor = null; // the id of the last event received: where a reopened stream resumes
      this.es = null;
      this.done = false;
      this.failures = 0;
      this.timer = null;
      this.opens = 0; // connections opened (more than one: the stream was resumed)
      this.duplicates = 0; // entries received again and dropped: a resume that repeated itself
      this.attempts = new Map(); // job -> newest attempt seen
      this.seen = new Map(); // job -> Set of "attempt:seq" shown (null once the job has ended)
    }

    url() {
      const url = new URL(this.path, location.href);
      if (this.token) url.searchParams.set("token", this.token);
      if (this.cursor) url.searchParams.set("since", this.cursor);
      return url.pathname + url.search;
    }

    open() {
      if (this.done) return;
      const es = new EventSource(this.url());
      this.es = es;
      setConnection("connecting");
      es.onopen = () => {
        if (es !== this.es) return;
        this.failures = 0;
        this.opens += 1;
        ui.connection.dataset.opens = String(this.opens);
        setConnection("live");
      };
      es.onerror = (ev) => {
        if (es !== this.es) return;
        if (typeof ev.data === "string") {
          this.receive("error", ev); // an `error` event of the stream, not a connection error
          return;
        }
        this.lost();
      };
      for (const type of [...ENTRY_EVENTS, ...NOTICE_EVENTS, "message"]) {
        if (type === "error") continue; // handled by onerror above
        es.addEventListener(type, (ev) => {
          if (es === this.es) this.receive(type, ev);
        });
      }
    }

    close() {
      this.done = true;
      clearTimeout(this.timer);
      if (this.es) this.es.close();
      this.es = null;
      setConnection("closed");
    }

    lost() {
      if (this.done) return;
      if (this.es.readyState === EventSource.CONNECTING) {
        setConnection("reconnecting"); // EventSource retries by itself, with Last-Event-ID
        return;
      }
      // EventSource gave up (an HTTP error status, e.g. while the gateway restarts): reopen it ourselves
      this.es.close();
      this.failures += 1;
      const delay = Math.min(1000 * 2 ** (this.failures - 1), 15000);
      setConnection("reconnecting");
      this.timer = setTimeout(() => this.probe(), delay);
    }

    async probe() {
      // a refusal that will not go away (bad token, unknown job) stops here; anything else reopens
      if (this.done) return;
      if (this.job) {
        const result = await api("GET", `/jobs/${encodeURIComponent(this.job)}`, { bearer: this.token || apiKey() });
        if ([401, 403, 404].includes(result.status)) {
          notice(refusal(`cannot follow job ${this.job}`, result), "error");
          setStatus("refused", `refused (${result.status})`);
          this.close();
          return;
        }
      }
      this.open();
    }

    receive(type, ev) {
      if (this.done) return;
      let data;
      try {
        data = JSON.parse(ev.data);
      } catch {
        notice(`an event of type ${type} is not JSON; skipped`, "warning");
        return;
      }
      if (ev.lastEventId) this.cursor = ev.lastEventId;
      const kind = type === "message" && data && typeof data.type === "string" ? data.type : type;
      if (kind === "restart") {
        this.restart(data.job, data.attempt, data.previous_attempt);
      } else if (kind === "gap") {
        notice(`gap in ${data.stream}: entries after ${data.after} were trimmed before they were read `
          + `(the first still kept is ${data.first_available}); what is shown is incomplete`, "warning");
      } else if (kind === "overflow") {
        notice(`the gateway dropped this connection: ${data.detail || "the page fell behind"}; resuming`, "warning");
      } else if (kind === "gateway_error") {
        notice(`gateway: ${data.detail || data.error || "error"}; resuming`, "warning");
      } else if (data && typeof data.job === "string") {
        this.entry(kind, data);
      }
    }

    restart(job, attempt, previous) {
      if ((this.attempts.get(job) || 0) >= attempt) return;
      this.attempts.set(job, attempt);
      this.seen.set(job, new Set());
      for (const el of runsOf(job)) el.remove();
      notice(`job ${job}: attempt ${previous} was interrupted; attempt ${attempt} starts over`, "warning");
      if (this.job === job) setStatus("running", `running (attempt ${attempt})`);
    }

    entry(type, entry) {
      const newest = this.attempts.get(entry.job) || 0;
      if (entry.attempt < newest) return; // an attempt that a newer one superseded
      if (entry.attempt > newest) {
        if (newest) this.restart(entry.job, entry.attempt, newest);
        else {
          this.attempts.set(entry.job, entry.attempt);
          this.seen.set(entry.job, new Set());
        }
      }
      const seen = this.seen.get(entry.job);
      if (seen === null) return; // the job has ended: nothing after its final entry counts
      const key = `${entry.attempt}:${entry.seq}`;
      if (seen.has(key)) { // already shown: never append twice
        this.duplicates += 1;
        ui.connection.dataset.duplicates = String(this.duplicates);
        return;
      }
      seen.add(key);

      if (type === "start") {
        if (this.job === entry.job) setStatus("running", `running (attempt ${entry.attempt})`);
      } else if (TERMINAL.has(type)) {
        this.terminal(type, entry);
      } else if (TEXT.has(type) && typeof entry.content === "string" && entry.content !== "") {
        this.show(entry);
      }
    }

    show(entry) {
      const tags = Array.isArray(entry.tags) && entry.tags.length ? entry.tags : [UNTAGGED];
      const title = describe(entry);
      for (const tag of new Set(tags)) {
        const span = document.createElement("span");
        span.className = `tok tok-${entry.type}`;
        span.title = title;
        span.textContent = entry.content;
        run(tag, entry).append(span);
      }
    }

    terminal(type, entry) {
      const data = entry.data && typeof entry.data === "object" ? entry.data : {};
      if (entry.retry) {
        notice(`job ${entry.job}: attempt ${entry.attempt} ended (${type}${entry.error ? `: ${entry.error}` : ""}); `
          + "the job runs again", "warning");
        return;
      }
      for (const el of runsOf(entry.job)) el.dataset.state = type;
      this.seen.set(entry.job, null); // forget its (attempt, seq) pairs: a tag view may run for long
      if (this.job !== entry.job) return; // a tag view goes on
      const parts = [type];
      if (typeof data.chunks === "number") parts.push(`${data.chunks} chunks`);
      if (typeof data.elapsed_ms === "number") parts.push(`${(data.elapsed_ms / 1000).toFixed(2)} s`);
      if (entry.error) parts.push(entry.error);
      setStatus(type, parts.join(" · "));
      ui.cancel.disabled = true;
      this.close();
    }
  }

  // -- what the user does -------------------------------------------------------------------------
  function follow(options, { title, cancellable = false }) {
    if (current) current.close();
    clearColumns();
    ui.connection.dataset.opens = "0";
    ui.connection.dataset.duplicates = "0";
    ui.notices.replaceChildren();
    document.body.classList.toggle("tag-view", !options.job);
    ui.jobId.textContent = title;
    ui.cancel.disabled = !cancellable;
    setStatus(options.job ? "connecting" : "following", options.job ? "connecting" : "following tags");
    current = new Watch(options);
    current.open();
  }

  async function enqueue(event) {
    event.preventDefault();
    const topic = ui.topic.value.trim();
    if (!topic) return;
    if (config.auth && !apiKey()) {
      notice("this gateway needs an API key to enqueue: enter it above", "error");
      ui.apiKey.focus();
      return;
    }
    ui.go.disabled = true;
    setStatus("enqueueing", "enqueueing");
    const result = await api("POST", "/jobs", {
      body: { graph: "joke_poem", input: { topic } }, bearer: apiKey(),
    });
    ui.go.disabled = false;
    if (!result.ok) {
      setStatus("refused", `refused (${result.status})`);
      notice(refusal("enqueue failed", result), "error");
      return;
    }
    const job = result.body;
    sessionStorage.setItem(LAST_JOB_STORAGE, JSON.stringify({
      job: job.job_id, token: job.token, expires: job.token_expires,
    }));
    history.replaceState(null, "", `#job=${encodeURIComponent(job.job_id)}`);
    follow({ path: job.urls.events, job: job.job_id, token: job.token }, { title: job.job_id, cancellable: true });
    current.cancelUrl = job.urls.cancel;
  }

  async function cancel() {
    if (!current || !current.job) return;
    ui.cancel.disabled = true;
    const url = current.cancelUrl || `/jobs/${encodeURIComponent(current.job)}`;
    const result = await api("DELETE", url, { bearer: apiKey() });
    if (result.ok) notice(`job ${current.job}: cancelling`);
    else notice(refusal("cancel failed", result), "error");
  }

  async function tokenFor(grant) {
    // a subscribe token for a view: minted with the API key when the gateway wants credentials
    if (!config.auth) return { ok: true, token: null };
    const last = JSON.parse(sessionStorage.getItem(LAST_JOB_STORAGE) || "null");
    const fresh = last && last.token && last.expires * 1000 > Date.now() + 60000;
    if (grant.jobs && fresh && last.job === grant.jobs[0]) return { ok: true, token: last.token };
    if (!apiKey()) return { ok: false, why: "this gateway needs an API key to watch: enter it above" };
    const result = await api("POST", "/tokens", { body: grant, bearer: apiKey() });
    if (!result.ok) return { ok: false, why: refusal("no subscribe token", result) };
    return { ok: true, token: result.body.token };
  }

  async function watchJob(job) {
    const token = await tokenFor({ jobs: [job] });
    if (!token.ok) {
      notice(token.why, "error");
      return;
    }
    history.replaceState(null, "", `#job=${encodeURIComponent(job)}`);
    follow({ path: `/jobs/${encodeURIComponent(job)}/events`, job, token: token.token }, { title: job, cancellable: true });
  }

  async function watchTags(tags) {
    const token = await tokenFor({ tags });
    if (!token.ok) {
      notice(token.why, "error");
      return;
    }
    const [first, ...rest] = tags;
    const query = rest.map((t) => `tag=${encodeURIComponent(t)}`).join("&");
    const path = `/tags/${encodeURIComponent(first)}/events${query ? `?${query}` : ""}`;
    history.replaceState(null, "", `#tag=${tags.map(encodeURIComponent).join(",")}`);
    follow({ path, job: null, token: token.token }, { title: `tags ${tags.join(", ")}` });
  }

  function watch(event) {
    event.preventDefault();
    const target = ui.watchTarget.value.trim();
    const names = target.split(",").map((s) => s.trim()).filter(Boolean);
    if (!names.length || !names.every((n) => NAME.test(n))) {
      notice("job ids and tags are 1–128 characters of A–Z a–z 0–9 . _ : -", "error");
      return;
    }
    if (ui.watchKind.value === "job") {
      if (names.length !== 1) {
        notice("watch one job id at a time", "error");
        return;
      }
      watchJob(names[0]);
    } else {
      watchTags(names);
    }
  }

  function fromHash() {
    // #job=ID or #tag=a,b: a link to a view (a reload replays the job from its start)
    const params = new URLSearchParams(location.hash.slice(1));
    const job = params.get("job");
    const tags = (params.get("tag") || "").split(",").filter(Boolean);
    if (job && NAME.test(job)) {
      ui.watchKind.value = "job";
      ui.watchTarget.value = job;
      watchJob(job);
    } else if (tags.length && tags.every((t) => NAME.test(t))) {
      ui.watchKind.value = "tag";
      ui.watchTarget.value = tags.join(",");
      watchTags(tags);
    }
  }

  async function start() {
    ui.enqueue.addEventListener("submit", enqueue);
    ui.watch.addEventListener("submit", watch);
    ui.cancel.addEventListener("click", cancel);
    ui.auth.addEventListener("submit", (event) => event.preventDefault());
    ui.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || "";
    ui.apiKey.addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, ui.apiKey.value));
    const result = await api("GET", "/config");
    if (result.ok && result.body) {
      config.auth = Boolean(result.body.auth);
      ui.auth.hidden = !config.auth;
    } else {
      notice(refusal("could not read the gateway's /config", result), "warning");
    }
    document.body.dataset.ready = "";
    fromHash();
  }

  start();
})();
