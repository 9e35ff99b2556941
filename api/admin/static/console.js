// The admin console: signs in with a pasted token, lists entities, follows one, and sends
// admin actions, all through the GraphQL API. The API decides what a token may do; this
// script only asks.
"use strict";

(() => {
  const root = document.getElementById("console");
  const GRAPHQL = root.dataset.graphql;
  const AUTH_REQUIRED = root.dataset.authRequired === "true";
  const ROLES_CLAIM = root.dataset.rolesClaim;
  const TOKEN_KEY = "tenure.admin.token";
  const REFRESH_MS = 1000;
  const PAUSED_REFRESH_MS = 3000; // a PAUSED bulk command followed
  // An answer not come in this long never comes: the API bounds its own waits far below it
  // (a LIVE read 2 s, a waited command 10 s), so the request is held by a network or a proxy
  // that lost it. It fails UNAVAILABLE, and what reads again (a followed entity or bulk
  // command, the detail's polling) goes on, where it waited for good.
  const REQUEST_TIMEOUT_MS = 30000;
  // Answers asking again cannot change; after any other error a read may pass.
  const FINAL_CODES = ["INVALID_INPUT", "FORBIDDEN", "UNAUTHENTICATED"];

  // ---------------------------------------------------------------- the API

  class ApiError extends Error {
    constructor(code, message) {
      super(message);
      this.code = code;
    }
  }

  // The answer's data, or an ApiError for its first error. With `partial`, data that came
  // with errors of some fields only (a history the entity's worker cannot answer while it
  // is down) is kept: `{ data, errors }`.
  async function graphql(query, variables = {}, partial = false) {
    const headers = {
      "content-type": "application/json",
      accept: "application/graphql-response+json, application/json",
    };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.authorization = `Bearer ${token}`;
    const late = new AbortController();
    const timer = setTimeout(() => late.abort(), REQUEST_TIMEOUT_MS);
    const tooLate = () =>
      new ApiError("UNAVAILABLE", `the API did not answer within ${REQUEST_TIMEOUT_MS / 1000} s`);
    let response;
    let body = null;
    try {
      try {
        response = await fetch(GRAPHQL, {
          method: "POST",
          headers,
          body: JSON.stringify({ query, variables }),
          signal: late.signal,
        });
      } catch (err) {
        if (late.signal.aborted) throw tooLate();
        throw new ApiError("UNAVAILABLE", "the API cannot be reached");
      }
      try {
        body = await response.json();
      } catch (err) {
        if (late.signal.aborted) throw tooLate();
        // not JSON: said below
      }
    } finally {
      clearTimeout(timer);
    }
    // Errors below the root field only: one of the root field itself (the entity refused,
    // out of reach) is the answer's error, as before.
    const fieldsOnly =
      body && body.data && body.errors && body.errors.every((e) => e.path && e.path.length > 1);
    if (partial && fieldsOnly && response.ok) {
      return { data: body.data, errors: body.errors };
    }
    const error = body && body.errors && body.errors[0];
    if (error) {
      const code = (error.extensions && error.extensions.code) || "ERROR";
      if (code === "UNAUTHENTICATED" && signedIn()) {
        signOut(`Signed out: the API refused the token (${error.message}).`);
      }
      throw new ApiError(code, error.message);
    }
    if (!response.ok || !body || !body.data) {
      throw new ApiError(`HTTP_${response.status}`, `the API answered HTTP ${response.status}`);
    }
    return partial ? { data: body.data, errors: [] } : body.data;
  }

  const HISTORY = `history(last: 20) { entries { commandId command at sentBy { role subject }
    outcome code message revision } hasOlder }`;

  // What the console reads and lists of each kind. `read` names its result `entity`.
  const KINDS = {
    account: {
      noun: "Account",
      plural: "accounts",
      list: "accounts",
      filterType: "AccountFilter",
      stats: "accountStats",
      key: "id",
      read: `query($key: ID!) { entity: account(id: $key) { id status ownerName email currency
        balance suspensionReason kycReference lastActivityAt revision updatedAt source stale
        ${HISTORY} } }`,
      changed: `subscription($key: ID!) { change: accountChanged(id: $key) { revision } }`,
    },
    cart: {
      noun: "Cart",
      plural: "carts",
      list: "carts",
      filterType: "CartFilter",
      stats: "cartStats",
      key: "id",
      read: `query($key: ID!) { entity: cart(id: $key) { id accountId status total
        checkoutAttempts checkoutId orderId failureCode failureReason lastActivityAt
        abandonedAt revision updatedAt source stale
        lines { sku quantity unitPrice lineTotal } ${HISTORY} } }`,
      changed: `subscription($key: ID!) { change: cartChanged(id: $key) { revision } }`,
    },
    inventory: {
      noun: "Inventory item",
      plural: "inventory items",
      list: "inventoryItems",
      filterType: "InventoryItemFilter",
      stats: "inventoryStats",
      key: "sku",
      read: `query($key: String!) { entity: inventoryItem(sku: $key) { sku name onHand reserved
        available sold revision updatedAt source stale
        reservations { reservationId quantity expiresAt } adjustments { delta reason at }
        ${HISTORY} } }`,
      changed: `subscription($key: String!) { change: inventoryItemChanged(sku: $key) {
        revision } }`,
    },
    checkout: {
      noun: "Checkout",
      read: `query($key: ID!) { entity: checkout(id: $key) { id cartId accountId status total
        orderId failureCode failureReason lines { sku quantity unitPrice lineTotal }
        steps { name status at code message }
        compensations { name status at reason code message } awaitingOperatorUntil
        operatorActions { action reason by at refused } } }`,
    },
  };

  // Admin actions: each asks for confirmation, then sends its mutation and waits for the
  // entity's answer.
  const ACTIONS = {
    suspend: {
      confirm: (key) => `Suspend account ${key}? Money commands will be refused.`,
      mutation: `mutation($key: ID!, $reason: String, $idem: String) {
        suspendAccount(id: $key, reason: $reason, idempotencyKey: $idem, wait: true)
        { commandId } }`,
      variables: (form) => ({ reason: form.get("reason") || null }),
      done: "suspended",
    },
    reactivate: {
      confirm: (key) => `Reactivate account ${key}?`,
      mutation: `mutation($key: ID!, $idem: String) {
        reactivateAccount(id: $key, idempotencyKey: $idem, wait: true) { commandId } }`,
      variables: () => ({}),
      done: "reactivated",
    },
    close: {
      confirm: (key) => `Close account ${key} for good? Its balance must be zero.`,
      mutation: `mutation($key: ID!, $idem: String) {
        closeAccount(id: $key, idempotencyKey: $idem, wait: true) { commandId } }`,
      variables: () => ({}),
      done: "closed",
    },
    restock: {
      confirm: (key, form) => `Receive ${form.get("quantity")} units of ${key}?`,
      mutation: `mutation($key: String!, $quantity: Long!, $idem: String) {
        restock(sku: $key, quantity: $quantity, idempotencyKey: $idem, wait: true)
        { commandId } }`,
      variables: (form) => ({ quantity: Number(form.get("quantity")) }),
      done: "restocked",
    },
    adjust: {
      confirm: (key, form) =>
        `Adjust the stock of ${key} by ${form.get("delta")} (${form.get("reason")})?`,
      mutation: `mutation($key: String!, $delta: Long!, $reason: String!, $idem: String) {
        adjustStock(sku: $key, delta: $delta, reason: $reason, idempotencyKey: $idem,
                    wait: true) { commandId } }`,
      variables: (form) => ({ delta: Number(form.get("delta")), reason: form.get("reason") }),
      done: "adjusted",
    },
    retryCompensations: {
      confirm: (key, form) =>
        `Run the refused compensations of checkout ${key} again (${form.get("reason")})?`,
      mutation: `mutation($key: ID!, $reason: String!, $idem: String) {
        retryCheckoutCompensations(id: $key, reason: $reason, idempotencyKey: $idem) { id } }`,
      variables: (form) => ({ reason: form.get("reason") }),
      done: "retried (see its operator actions)",
    },
    resolve: {
      confirm: (key, form) =>
        `Mark checkout ${key} as settled by hand (${form.get("reason")})? ` +
        "Nothing more will run for it.",
      mutation: `mutation($key: ID!, $reason: String!, $idem: String) {
        resolveCheckout(id: $key, reason: $reason, idempotencyKey: $idem) { id } }`,
      variables: (form) => ({ reason: form.get("reason") }),
      done: "resolved (see its operator actions)",
    },
  };

  // ---------------------------------------------------------------- live updates

  // How an open detail keeps up with its entity: `show` is called with each state read.
  // It subscribes to the entity's changes over graphql-transport-ws and reads the entity
  // (fields and history) again at each; without a subscription (a checkout) or when the
  // socket fails, it reads again every second while the tab is visible.
  function follow(kind, key, show, fail) {
    const subscription = KINDS[kind].changed;
    if (!subscription || !("WebSocket" in window)) return poll(kind, key, show, fail);
    let stopped = false;
    let refused = false;
    let reading = false;
    let again = false;
    let fallback = null;
    let retry = 0;
    const read = async () => {
      if (reading) {
        again = true; // changes that come during a read make one more read, not one each
        return;
      }
      reading = true;
      try {
        const { data, errors } = await graphql(KINDS[kind].read, { key }, true);
        if (!stopped) show(data.entity, errors);
      } catch (err) {
        if (!stopped) {
          fail(err);
          // Read again in a second: the change it was for showed nothing, and the next one
          // may never come (a quiet account kept its state from before, shown live).
          if (!(err instanceof ApiError && FINAL_CODES.includes(err.code))) {
            clearTimeout(retry);
            retry = setTimeout(() => !stopped && read(), REFRESH_MS);
          }
        }
      }
      reading = false;
      if (again && !stopped) {
        again = false;
        read();
      }
    };
    const toPolling = () => {
      if (stopped || refused || fallback) return;
      detailPane.dataset.live = "polling";
      fallback = poll(kind, key, show, fail);
    };
    const url = new URL(GRAPHQL, location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    let socket;
    try {
      socket = new WebSocket(url, "graphql-transport-ws");
    } catch (err) {
      return poll(kind, key, show, fail);
    }
    const send = (message) => socket.send(JSON.stringify(message));
    socket.onopen = () => {
      const token = sessionStorage.getItem(TOKEN_KEY);
      send({ type: "connection_init", payload: token ? { Authorization: `Bearer ${token}` } : {} });
    };
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "connection_ack") {
        send({ id: "detail", type: "subscribe", payload: { query: subscription, variables: { key } } });
        detailPane.dataset.live = "subscribed";
      } else if (message.type === "ping") {
        send({ type: "pong" });
      } else if (message.type === "next" || message.type === "error") {
        const errors = message.type === "error" ? message.payload : message.payload.errors;
        if (errors && errors.length) {
          const code = (errors[0].extensions && errors[0].extensions.code) || "ERROR";
          // A final refusal stops following; any other (the server's subscribers full, the
          // server shutting down for a deploy) reads every second instead, as a socket
          // that fails does: a refused subscription froze the detail, shown "live".
          refused = FINAL_CODES.includes(code);
          if (!stopped) fail(new ApiError(code, errors[0].message));
          if (refused) detailPane.dataset.live = "stopped";
          else toPolling();
        } else {
          read();
        }
      } else if (message.type === "complete") {
        toPolling();
      }
    };
    socket.onclose = toPolling; // refused at connection_init, or the server went away
    read(); // at once: the entity may not exist yet, and then nothing comes
    return () => {
      stopped = true;
      clearTimeout(retry);
      socket.close();
      if (fallback) fallback();
    };
  }

  function poll(kind, key, show, fail) {
    detailPane.dataset.live = "polling";
    let stopped = false;
    let timer = 0;
    const tick = async () => {
      if (!document.hidden) {
        try {
          const { data, errors } = await graphql(KINDS[kind].read, { key }, true);
          if (!stopped) show(data.entity, errors);
        } catch (err) {
          if (!stopped) fail(err);
        }
      }
      if (!stopped) timer = setTimeout(tick, REFRESH_MS);
    };
    tick();
    return () => {
      stopped = true;
      clearTimeout(timer);
    };
  }

  // ---------------------------------------------------------------- small helpers

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value !== null && value !== undefined) node.setAttribute(name, value);
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : String(child ?? ""));
    }
    return node;
  }

  function when(value) {
    if (!value) return "";
    const date = new Date(value);
    return Number.isNaN(date.getTime()) ? value : date.toLocaleString();
  }

  function shown(field, value) {
    if (value === null || value === undefined) return "—";
    if (/(At|Until)$/.test(field)) return when(value);
    if (field === "refused") {
      return value.map((step) => `${step.name}: ${step.code || ""} ${step.message || ""}`).join("; ");
    }
    return String(value);
  }

  function newKey() {
    if (window.crypto && crypto.randomUUID) return `console-${crypto.randomUUID()}`;
    return `console-${Date.now()}-${Math.random().toString(36).slice(2)}`;
  }

  function say(message, isError = false) {
    const notice = document.getElementById("notice");
    notice.textContent = message;
    notice.classList.toggle("error", isError);
    notice.hidden = !message;
  }

  // A read that works again takes back the notice its failure left, and only that one.
  function recovered(prefix) {
    if (document.getElementById("notice").textContent.startsWith(prefix)) say("");
  }

  function failure(err) {
    return err instanceof ApiError ? `${err.code}: ${err.message}` : String(err);
  }

  function table(headings, rows) {
    return el(
      "table",
      { class: "list" },
      el("thead", {}, el("tr", {}, ...headings.map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c))))),
    );
  }

  // ---------------------------------------------------------------- signing in

  function claimsOf(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(part), (c) => c.charCodeAt(0));
      return JSON.parse(new TextDecoder().decode(bytes));
    } catch (err) {
      return null;
    }
  }

  // As the API finds it (api/auth.py `claim`): the claim by its name, else a dotted name as a
  // path into nested claims (Keycloak's `realm_access.roles`).
  function claimOf(claims, name) {
    if (!claims) return undefined;
    if (name in claims || !name.includes(".")) return claims[name];
    let found = claims;
    for (const part of name.split(".")) {
      if (found === null || typeof found !== "object" || !(part in found)) return undefined;
      found = found[part];
    }
    return found;
  }

  function rolesOf(claims) {
    const roles = claimOf(claims, ROLES_CLAIM);
    if (typeof roles === "string") return roles.split(/\s+/);
    return Array.isArray(roles) ? roles : [];
  }

  function signedIn() {
    return sessionStorage.getItem(TOKEN_KEY) !== null;
  }

  // Counts over every account: a customer's token is refused them (FORBIDDEN).
  const ADMIN_CHECK = "{ accountStats { total } }";

  async function signIn(token) {
    const error = document.getElementById("sign-in-error");
    error.hidden = true;
    const refuse = (message) => {
      sessionStorage.removeItem(TOKEN_KEY);
      error.textContent = message;
      error.hidden = false;
    };
    if (!token && AUTH_REQUIRED) return refuse("Paste an admin token to sign in.");
    const claims = token ? claimsOf(token) : null;
    const roles = rolesOf(claims);
    const who = claims ? `${roles.join(",") || "no role"}:${claims.sub}` : "this token";
    sessionStorage.setItem(TOKEN_KEY, token);
    try {
      await graphql(ADMIN_CHECK);
    } catch (err) {
      if (err.code === "FORBIDDEN") {
        return refuse(
          `Refused: ${who} may not administer Tenure (the API answered FORBIDDEN). ` +
            "A customer token cannot sign in here; use an admin token.",
        );
      }
      if (err.code === "UNAUTHENTICATED") return refuse(`Refused: ${err.message}.`);
      return refuse(`Cannot sign in: ${failure(err)}.`);
    }
    if (token && !roles.includes("admin")) {
      return refuse(`Refused: ${who} is not an admin, and the console is for admins.`);
    }
    document.getElementById("who-name").textContent = token
      ? `admin:${claims.sub}`
      : "the development admin (no authentication configured)";
    document.getElementById("who").hidden = false;
    document.getElementById("sign-in").hidden = true;
    document.getElementById("workspace").hidden = false;
    showTab("accounts");
  }

  function signOut(message = "") {
    sessionStorage.removeItem(TOKEN_KEY);
    closeDetail();
    if (bulk) clearTimeout(bulk.timer);
    bulk = null;
    clearTimeout(bulkList.timer);
    document.getElementById("who").hidden = true;
    document.getElementById("workspace").hidden = true;
    document.getElementById("sign-in").hidden = false;
    document.getElementById("token").value = "";
    const error = document.getElementById("sign-in-error");
    error.textContent = message;
    error.hidden = !message;
  }

  // ---------------------------------------------------------------- lists

  class Listing {
    constructor(pane) {
      this.pane = pane;
      this.kindName = pane.dataset.kind;
      this.kind = KINDS[this.kindName];
      this.form = pane.querySelector("form.filter");
      this.columns = [...pane.querySelectorAll("th[data-column]")].map((th) => th.dataset.column);
      // The cursors of the pages shown before and now, and the list they are of (filter,
      // page size, order as last applied): paging goes on with the list on screen, not
      // with a form being edited, and moves only once the page has come.
      this.cursors = [null];
      this.applied = null;
      this.form.addEventListener("submit", (event) => {
        event.preventDefault();
        this.load([null], this.fromForm());
      });
      pane.querySelector("[data-next]").addEventListener("click", () => {
        this.load([...this.cursors, this.endCursor]);
      });
      pane.querySelector("[data-previous]").addEventListener("click", () => {
        this.load(this.cursors.slice(0, -1));
      });
    }

    fromForm() {
      const form = new FormData(this.form);
      return {
        filter: this.filter(),
        first: Number(form.get("first")),
        orderBy: form.get("orderBy"),
      };
    }

    filter() {
      const form = new FormData(this.form);
      const filter = {};
      const statuses = form.getAll("status");
      if (statuses.length) filter.status = statuses;
      for (const name of ["text", "accountId"]) {
        const value = (form.get(name) || "").trim();
        if (value) filter[name] = value;
      }
      for (const name of ["updatedAfter", "updatedBefore"]) {
        const value = form.get(name);
        if (value) filter[name] = new Date(value).toISOString();
      }
      if (form.get("lowStock")) filter.lowStock = Number(form.get("lowStock"));
      if (form.get("hideClosed")) filter.closed = false;
      return filter;
    }

    // The page after the last of `cursors` of the list `applied` (the one on screen unless
    // given; the form's, before any was applied).
    async load(cursors = this.cursors, applied = this.applied || this.fromForm()) {
      const k = this.kind;
      const fields = [...new Set([k.key, ...this.columns])].join(" ");
      const query = `query($filter: ${k.filterType}, $first: Int!, $after: String,
          $orderBy: ListOrder!) {
        page: ${k.list}(filter: $filter, first: $first, after: $after, orderBy: $orderBy) {
          edges { node { ${fields} } } pageInfo { hasNextPage endCursor } totalCount }
        stats: ${k.stats} { byStatus { status count } total } }`;
      const asked = (this.asked = (this.asked || 0) + 1);
      let data;
      try {
        data = await graphql(query, { ...applied, after: cursors[cursors.length - 1] });
      } catch (err) {
        if (asked !== this.asked) return;
        say(`Cannot list ${k.list}: ${failure(err)}`, true);
        // What the table shows is not the page asked for: marked so, until one comes.
        this.pane.querySelector("table.list").dataset.stale = "true";
        return;
      }
      if (asked !== this.asked) return; // an older answer arriving late is dropped
      recovered(`Cannot list ${k.list}:`);
      this.pane.querySelector("table.list").dataset.stale = "false";
      this.cursors = cursors;
      this.applied = applied;
      this.render(data);
    }

    render({ page, stats }) {
      const k = this.kind;
      const counts = stats.byStatus.map((s) => `${s.status} ${s.count}`);
      const all = [...counts, `${stats.total} in all`].join(" · ");
      this.pane.querySelector("[data-stats]").textContent = `All ${k.plural}: ${all}`;
      const body = this.pane.querySelector("tbody");
      body.replaceChildren(
        ...page.edges.map(({ node }) => {
          const key = node[this.kind.key];
          const row = el("tr", { "data-key": key, tabindex: "0" });
          for (const column of this.columns) {
            row.append(el("td", { "data-column": column }, shown(column, node[column])));
          }
          const open = () => openDetail(this.kindName, key);
          row.addEventListener("click", open);
          row.addEventListener("keydown", (event) => event.key === "Enter" && open());
          return row;
        }),
      );
      if (!page.edges.length) {
        body.append(el("tr", {}, el("td", { colspan: this.columns.length }, "Nothing matches.")));
      }
      this.endCursor = page.pageInfo.endCursor;
      const number = this.cursors.length;
      // The count is of entities, not pages: "page 1 of 2" would read as pages.
      const total = page.totalCount === null ? "" : ` · ${page.totalCount} matching`;
      this.pane.querySelector("[data-position]").textContent = `page ${number}${total}`;
      this.pane.querySelector("[data-previous]").disabled = number === 1;
      this.pane.querySelector("[data-next]").disabled = !page.pageInfo.hasNextPage;
    }
  }

  const listings = {};
  for (const pane of document.querySelectorAll(".pane[data-kind]")) {
    listings[pane.dataset.pane] = new Listing(pane);
  }

  function showTab(name) {
    for (const button of document.querySelectorAll("#tabs [data-tab]")) {
      button.setAttribute("aria-pressed", String(button.dataset.tab === name));
    }
    for (const pane of document.querySelectorAll(".pane")) {
      pane.hidden = pane.dataset.pane !== name;
    }
    if (listings[name]) listings[name].load();
    if (name === "operator") loadNeedingOperator();
    if (name === "bulk") loadBulkList();
  }

  // ---------------------------------------------------------------- checkouts needing an operator

  const operatorPane = document.querySelector('.pane[data-pane="operator"]');
  const NEEDING_OPERATOR = `query($after: String) {
    page: checkouts(filter: { status: [FAILED] }, first: 20, after: $after) {
      edges { node { id accountId total failureCode failureReason awaitingOperatorUntil
        refused { name code message } } }
      pageInfo { hasNextPage endCursor } totalCount } }`;
  let operatorCursors = [null];
  let operatorAsked = 0;
  const CANNOT_LIST_FAILED = "Cannot list the checkouts needing an operator:";

  // The page after the last of `cursors`; they become the pages shown once it has come.
  async function loadNeedingOperator(cursors = operatorCursors) {
    const headings = operatorPane.querySelectorAll("th[data-column]");
    const columns = [...headings].map((th) => th.dataset.column);
    const asked = ++operatorAsked;
    let data;
    try {
      data = await graphql(NEEDING_OPERATOR, { after: cursors[cursors.length - 1] });
    } catch (err) {
      if (asked !== operatorAsked) return;
      say(`${CANNOT_LIST_FAILED} ${failure(err)}`, true);
      // What the table shows is not the page asked for: marked so, until one comes.
      operatorPane.querySelector("table.list").dataset.stale = "true";
      return;
    }
    // An older answer arriving late (a reload after a resolve, then Previous) is dropped.
    if (asked !== operatorAsked) return;
    recovered(CANNOT_LIST_FAILED);
    operatorPane.querySelector("table.list").dataset.stale = "false";
    operatorCursors = cursors;
    const { page } = data;
    const body = operatorPane.querySelector("tbody");
    body.replaceChildren(
      ...page.edges.map(({ node }) => {
        const row = el("tr", { "data-key": node.id, tabindex: "0" });
        for (const column of columns) {
          // A FAILED checkout whose wait ran out is listed still, and takes no action.
          const ended = column === "awaitingOperatorUntil" && !node[column];
          const text = ended ? "wait over: settle by hand" : shown(column, node[column]);
          row.append(el("td", { "data-column": column }, text));
        }
        const open = () => openDetail("checkout", node.id);
        row.addEventListener("click", open);
        row.addEventListener("keydown", (event) => event.key === "Enter" && open());
        return row;
      }),
    );
    if (!page.edges.length) {
      body.append(el("tr", {}, el("td", { colspan: columns.length }, "None: no checkout waits.")));
    }
    const total = page.totalCount === null ? "" : `${page.totalCount} `;
    operatorPane.querySelector("[data-stats]").textContent = `${total}FAILED in all`;
    operatorPane.querySelector("[data-position]").textContent = `page ${operatorCursors.length}`;
    operatorPane.querySelector("[data-previous]").disabled = operatorCursors.length === 1;
    const next = operatorPane.querySelector("[data-next]");
    next.disabled = !page.pageInfo.hasNextPage;
    next.dataset.cursor = page.pageInfo.endCursor || "";
  }

  operatorPane.querySelector("[data-next]").addEventListener("click", (event) => {
    loadNeedingOperator([...operatorCursors, event.target.dataset.cursor]);
  });
  operatorPane.querySelector("[data-previous]").addEventListener("click", () => {
    loadNeedingOperator(operatorCursors.slice(0, -1));
  });

  // ---------------------------------------------------------------- bulk commands

  // A bulk command followed by id: read every second while RUNNING, every few seconds while
  // PAUSED (another operator, or a script, may resume or cancel it), and once it has ended
  // only once per action. Read only while RUNNING, a PAUSED one resumed elsewhere still
  // showed PAUSED with Resume offered, after it had completed.
  const bulkPane = document.getElementById("bulk");
  const BULK = `query($id: ID!) { bulk: bulkCommand(id: $id) { id entityType command status
    total delivered deliveredAt done applied rejected failed failures { entityId code message }
    eta startedAt startedBy endedAt cancelRequested } }`;
  const BULK_ACTIONS = {
    pause: { mutation: "pauseBulkCommand", confirm: (id) => `Pause bulk command ${id}?` },
    resume: { mutation: "resumeBulkCommand", confirm: (id) => `Resume bulk command ${id}?` },
    cancel: {
      mutation: "cancelBulkCommand",
      confirm: (id) => `Cancel bulk command ${id}? Entities not reached yet never get it.`,
    },
  };
  let bulk = null; // { id, timer }

  function followBulk(id) {
    if (bulk) clearTimeout(bulk.timer);
    bulk = { id, timer: null };
    // Nothing is offered until this one is read: the last one's state is not its own.
    for (const button of bulkPane.querySelectorAll("[data-bulk]")) button.disabled = true;
    bulkPane.querySelector("[data-title]").textContent = `Bulk command ${id}`;
    bulkPane.querySelector("[data-fields]").replaceChildren();
    bulkPane.querySelector("[data-failures]").replaceChildren();
    bulkShown = "";
    bulkPane.hidden = false;
    readBulk(bulk);
  }

  async function readBulk(current) {
    clearTimeout(current.timer);
    let data;
    try {
      data = await graphql(BULK, { id: current.id });
    } catch (err) {
      if (bulk !== current) return;
      say(`Cannot read bulk command ${current.id}: ${failure(err)}`, true);
      // One failed read (the network, a restart) stopped following it for good.
      if (!FINAL_CODES.includes(err.code)) {
        current.timer = setTimeout(() => readBulk(current), REFRESH_MS);
      }
      return;
    }
    if (bulk !== current) return;
    recovered(`Cannot read bulk command ${current.id}:`);
    if (data.bulk === null) {
      say(`No bulk command ${current.id}.`, true);
      bulkPane.hidden = true;
      return;
    }
    renderBulk(data.bulk);
    clearTimeout(current.timer); // a read sent by an action meanwhile: still one timer
    if (data.bulk.status === "RUNNING" || data.bulk.status === "PAUSED") {
      const wait = data.bulk.status === "RUNNING" ? REFRESH_MS : PAUSED_REFRESH_MS;
      current.timer = setTimeout(() => readBulk(current), wait);
    }
  }

  let bulkShown = "";
  function renderBulk(b) {
    // Read every second: rebuilt only when it changed, so that a screen reader is not read
    // the whole block again each second (only the count is announced, `aria-live`).
    const shownNow = JSON.stringify(b);
    const changed = shownNow !== bulkShown;
    bulkShown = shownNow;
    const progress = bulkPane.querySelector("[data-progress]");
    progress.max = b.total || 1;
    progress.value = b.total ? b.done : 0;
    const total = b.total === null ? "?" : b.total;
    const count = bulkPane.querySelector("[data-count]");
    const counted = `${b.done}/${total} done, ${b.delivered}/${total} sent`;
    if (count.textContent !== counted) count.textContent = counted;
    if (changed) {
      const fields = ["status", "entityType", "command", "total", "delivered", "done",
        "applied", "rejected", "failed", "eta", "startedAt", "startedBy", "deliveredAt",
        "endedAt", "cancelRequested"];
      bulkPane.querySelector("[data-fields]").replaceChildren(
        ...fields.flatMap((name) => [
          el("dt", {}, name),
          el("dd", { "data-field": name }, shown(name, b[name])),
        ]),
      );
      const failures = b.failures.map((f) => [f.entityId, f.code, f.message]);
      bulkPane.querySelector("[data-failures]").replaceChildren(
        ...(failures.length
          ? [el("h3", {}, "Failures (the first 20)"), table(["Entity", "Code", "Message"], failures)]
          : []),
      );
    }
    // Once every target is sent nothing is left to pause or cancel, and a bulk being
    // cancelled takes no resume: the API refuses each, so they are not offered.
    const ended = ["COMPLETED", "CANCELLED"].includes(b.status);
    const allSent = b.deliveredAt !== null;
    bulkPane.querySelector('[data-bulk="pause"]').disabled =
      b.status !== "RUNNING" || allSent || b.cancelRequested;
    bulkPane.querySelector('[data-bulk="resume"]').disabled =
      b.status !== "PAUSED" || b.cancelRequested;
    bulkPane.querySelector('[data-bulk="cancel"]').disabled = ended || allSent;
  }

  for (const button of bulkPane.querySelectorAll("[data-bulk]")) {
    const action = BULK_ACTIONS[button.dataset.bulk];
    button.addEventListener("click", async () => {
      if (!bulk || !window.confirm(action.confirm(bulk.id))) return;
      const current = bulk;
      // Not sent twice: a second click's refusal took the place of the first one's notice.
      // The read that follows offers again what the bulk command takes.
      const buttons = bulkPane.querySelectorAll("[data-bulk]");
      buttons.forEach((b) => (b.disabled = true));
      try {
        // Its own key: should this request's answer be lost and the request reach the
        // bulk late, after another operator's resume, it is not taken twice.
        const mutation = `mutation($id: ID!, $idem: String) {
          ${action.mutation}(id: $id, idempotencyKey: $idem) { id } }`;
        await graphql(mutation, { id: current.id, idem: newKey() });
        say(`Bulk command ${current.id}: ${button.dataset.bulk} sent.`);
      } catch (err) {
        say(`${button.dataset.bulk} ${current.id} failed: ${failure(err)}`, true);
      }
      if (bulk === current) readBulk(current);
    });
  }

  // ---------------------------------------------------------------- the list of bulk commands

  // The recent bulk commands, each with its progress, read again every few seconds while
  // the tab is open; a row opens the bulk command above.
  const bulkList = {
    pane: document.querySelector("[data-bulk-list]"),
    cursors: [null],
    timer: 0,
    asked: 0,
  };
  const BULK_LIST = `query($status: [BulkCommandStatus!], $after: String) {
    page: bulkCommands(filter: { status: $status }, first: 20, after: $after) {
      edges { node { id running bulkCommand { entityType command status total done applied
        rejected failed startedAt } } }
      pageInfo { hasNextPage endCursor } totalCount } }`;
  const BULK_LIST_MS = 3000;

  // The page after the last of `cursors`; they become the pages shown once it has come.
  async function loadBulkList(cursors = bulkList.cursors) {
    clearTimeout(bulkList.timer);
    const tab = bulkList.pane.closest(".pane");
    if (tab.hidden || !signedIn()) return; // another tab: no more reads until it is back
    const asked = ++bulkList.asked;
    if (!document.hidden) {
      const statuses = new FormData(bulkList.pane.querySelector("form.filter")).getAll("status");
      try {
        const data = await graphql(BULK_LIST, {
          status: statuses.length ? statuses : null,
          after: cursors[cursors.length - 1],
        });
        if (asked !== bulkList.asked) return; // a newer read was asked meanwhile
        recovered("Cannot list the bulk commands:");
        bulkList.cursors = cursors;
        renderBulkList(data.page);
      } catch (err) {
        if (asked !== bulkList.asked) return;
        say(`Cannot list the bulk commands: ${failure(err)}`, true);
      }
    }
    if (asked === bulkList.asked) bulkList.timer = setTimeout(loadBulkList, BULK_LIST_MS);
  }

  function bulkRow({ id, running, bulkCommand: b }) {
    const row = el("tr", { "data-key": id, tabindex: "0" });
    const cell = (column, ...content) => row.append(el("td", { "data-column": column }, ...content));
    row.append(el("td", { "data-column": "id", title: id }, id));
    if (b) {
      const total = b.total === null ? "?" : b.total;
      const bar = el("progress", { max: b.total || 1, value: b.total ? b.done : 0 });
      cell("command", `${b.entityType}: ${b.command}`);
      cell("status", b.status);
      cell("progress", bar, " ", el("span", { "data-count": "" }, `${b.done}/${total}`));
      for (const column of ["applied", "rejected", "failed"]) cell(column, b[column]);
    } else {
      cell("command", "—");
      cell("status", running ? "running, not answering" : "not answering");
      for (const column of ["progress", "applied", "rejected", "failed"]) cell(column, "—");
    }
    const open = () => {
      followBulk(id);
      bulkPane.scrollIntoView({ block: "nearest" });
    };
    const button = el("button", { type: "button", class: "link" }, "Open");
    button.addEventListener("click", (event) => {
      event.stopPropagation();
      open();
    });
    cell("open", button);
    row.addEventListener("click", open);
    row.addEventListener("keydown", (event) => event.key === "Enter" && open());
    return row;
  }

  function renderBulkList(page) {
    const body = bulkList.pane.querySelector("tbody");
    // Read again every few seconds: the row (or its Open button) a keyboard user is on
    // keeps the focus, where it fell back to the page's start at each read.
    const focused = document.activeElement;
    const focusedRow = body.contains(focused) ? focused.closest("tr[data-key]") : null;
    const onButton = focused && focused.tagName === "BUTTON";
    body.replaceChildren(...page.edges.map(({ node }) => bulkRow(node)));
    if (focusedRow) {
      const again = [...body.querySelectorAll("tr[data-key]")].find(
        (row) => row.dataset.key === focusedRow.dataset.key,
      );
      if (again) (onButton ? again.querySelector("button") || again : again).focus();
    }
    const columns = bulkList.pane.querySelectorAll("th[data-column]").length;
    if (!page.edges.length) {
      body.append(el("tr", {}, el("td", { colspan: columns }, "None.")));
    }
    // The count is of bulk commands, not pages: "page 1 of 57" read as pages.
    const total = page.totalCount === null ? "" : ` · ${page.totalCount} bulk commands`;
    const number = bulkList.cursors.length;
    bulkList.pane.querySelector("[data-position]").textContent = `page ${number}${total}`;
    bulkList.pane.querySelector("[data-previous]").disabled = number === 1;
    const next = bulkList.pane.querySelector("[data-next]");
    next.disabled = !page.pageInfo.hasNextPage;
    next.dataset.cursor = page.pageInfo.endCursor || "";
  }

  bulkList.pane.querySelector("form.filter").addEventListener("submit", (event) => {
    event.preventDefault();
    loadBulkList([null]);
  });
  bulkList.pane.querySelector("[data-next]").addEventListener("click", (event) => {
    loadBulkList([...bulkList.cursors, event.target.dataset.cursor]);
  });
  bulkList.pane.querySelector("[data-previous]").addEventListener("click", () => {
    loadBulkList(bulkList.cursors.slice(0, -1));
  });

  // ---------------------------------------------------------------- one entity

  const detailPane = document.getElementById("detail");
  let detail = null; // { kind, key, stop, last }

  function openDetail(kind, key) {
    closeDetail();
    dropKeptKeys();
    delete detailPane.dataset.live; // the last one's: set again as this one is followed
    detail = { kind, key, last: null };
    detailPane.dataset.kind = kind;
    detailPane.querySelector("[data-title]").textContent = `${KINDS[kind].noun} ${key}`;
    detailPane.querySelector("[data-fields]").replaceChildren();
    detailPane.querySelector("[data-extra]").replaceChildren();
    detailPane.querySelector("[data-history]").replaceChildren();
    detailPane.querySelector("[data-error]").hidden = true;
    for (const actions of detailPane.querySelectorAll("[data-actions]")) {
      // A checkout's actions show once it is read FAILED (renderDetail).
      actions.hidden = actions.dataset.actions !== kind || kind === "checkout";
    }
    detailPane.querySelector("[data-history-block]").hidden = kind === "checkout";
    detailPane.hidden = false;
    refresh();
  }

  function refresh() {
    if (!detail) return;
    if (detail.stop) detail.stop();
    const current = detail;
    current.stop = follow(
      current.kind,
      current.key,
      (entity, errors) => renderDetail(current, entity, errors),
      (err) => {
        const error = detailPane.querySelector("[data-error]");
        error.textContent = `Cannot read ${current.key}: ${failure(err)}`;
        error.hidden = false;
        if (FINAL_CODES.includes(err.code)) {
          current.stop();
          if (detail === current) detailPane.dataset.live = "stopped";
        }
      },
    );
  }

  function closeDetail() {
    if (detail && detail.stop) detail.stop();
    detail = null;
    detailPane.hidden = true;
  }

  const NESTED = new Set([
    "history",
    "lines",
    "reservations",
    "adjustments",
    "steps",
    "compensations",
    "operatorActions",
  ]);

  function renderDetail(current, entity, errors = []) {
    if (detail !== current) return;
    detailPane.querySelector("[data-error]").hidden = true;
    const seen = JSON.stringify([entity, errors]);
    if (seen === current.last) return;
    current.last = seen;
    const fields = detailPane.querySelector("[data-fields]");
    if (entity === null) {
      fields.replaceChildren(el("p", { class: "note" }, "It does not exist."));
      return;
    }
    fields.replaceChildren(
      ...Object.entries(entity)
        .filter(([name]) => !NESTED.has(name))
        .flatMap(([name, value]) => [
          el("dt", {}, name),
          el("dd", { "data-field": name }, fieldValue(name, value)),
        ]),
    );
    detailPane.querySelector("[data-extra]").replaceChildren(...extras(entity));
    if (current.kind === "checkout") {
      // A FAILED checkout whose wait for an operator ran out takes no action any more:
      // Retry and Resolve were offered, and always refused "has ended".
      detailPane.querySelector('[data-actions="checkout"]').hidden =
        entity.status !== "FAILED" || !entity.awaitingOperatorUntil;
    }
    // The entity is shown from the cache while its worker is down; only its history, which
    // only the entity can tell, is then missing, and says why.
    const unread = errors.find((e) => e.path[e.path.length - 1] === "history");
    const note = detailPane.querySelector("[data-history-error]");
    note.hidden = !unread;
    if (unread) {
      const code = (unread.extensions && unread.extensions.code) || "ERROR";
      note.textContent = `History not available: ${code}: ${unread.message}`;
      detailPane.querySelector("[data-history]").replaceChildren();
      detailPane.querySelector("[data-older]").hidden = true;
    }
    if (entity.history) renderHistory(entity.history);
  }

  function fieldValue(name, value) {
    const links = { checkoutId: "checkout", cartId: "cart", accountId: "account" };
    if (value && links[name] && detail && detail.kind !== links[name]) {
      const button = el("button", { type: "button", class: "link" }, value);
      button.addEventListener("click", () => openDetail(links[name], value));
      return button;
    }
    return shown(name, value);
  }

  function extras(entity) {
    const blocks = [];
    const block = (title, headings, rows, attributes = {}) => {
      if (rows.length) blocks.push(el("section", attributes, el("h3", {}, title), table(headings, rows)));
    };
    const lines = (entity.lines || []).map((l) => [l.sku, l.quantity, l.unitPrice, l.lineTotal]);
    block("Lines", ["SKU", "Quantity", "Unit price", "Line total"], lines);
    block(
      "Reservations",
      ["Reservation", "Quantity", "Expires"],
      (entity.reservations || []).map((r) => [r.reservationId, r.quantity, when(r.expiresAt)]),
    );
    block(
      "Adjustments",
      ["Delta", "Reason", "At"],
      (entity.adjustments || []).map((a) => [a.delta, a.reason, when(a.at)]),
    );
    if (entity.steps) {
      const outcome = (s) => [s.status, s.code, s.message].filter(Boolean).join(" ");
      block(
        "Saga steps",
        ["Step", "Outcome", "At"],
        entity.steps.map((s) => [s.name, outcome(s), when(s.at)]),
        { "data-saga": "steps" },
      );
      block(
        "Compensations",
        ["Undoing", "Outcome", "Why", "At"],
        entity.compensations.map((c) => [c.name, outcome(c), c.reason, when(c.at)]),
        { "data-saga": "compensations" },
      );
      if (!entity.steps.length) blocks.push(el("p", { class: "note" }, "No step has run yet."));
      block(
        "Operator actions",
        ["Action", "By", "Reason", "At", "Refused"],
        entity.operatorActions.map((a) => [a.action, a.by, a.reason, when(a.at), a.refused]),
        { "data-operator-actions": "" },
      );
    }
    return blocks;
  }

  function renderHistory(history) {
    detailPane.querySelector("[data-history]").replaceChildren(
      ...history.entries.map((entry) => {
        const by = entry.sentBy
          ? [entry.sentBy.role, entry.sentBy.subject].filter(Boolean).join(":")
          : "—";
        const outcome = entry.outcome === "APPLIED"
          ? "applied"
          : `rejected ${entry.code || ""} ${entry.message || ""}`.trim();
        return el(
          "tr",
          { "data-command": entry.command || "", class: entry.outcome.toLowerCase() },
          el("td", {}, when(entry.at)),
          el("td", {}, entry.command || "—"),
          el("td", { "data-by": by }, by),
          el("td", {}, outcome),
          el("td", {}, entry.revision),
          el("td", { class: "id" }, entry.commandId),
        );
      }),
    );
    detailPane.querySelector("[data-older]").hidden = !history.hasOlder;
  }

  // Answers that leave a command's fate unknown: retried under the same key. A proxy's
  // answer that is no GraphQL (nginx's 502 or 504 when the API went away mid-request) may
  // come after the command was taken, as may the API's own 5xx.
  const UNCERTAIN = new Set(["UNAVAILABLE", "OUTCOME_UNKNOWN", "INTERNAL"]);
  const uncertain = (err) =>
    err instanceof ApiError && (UNCERTAIN.has(err.code) || /^HTTP_5\d\d$/.test(err.code));

  // Kept keys are dropped when another entity is opened, and when any action on the entity
  // succeeds: a key kept for an uncertain suspend, sent again after a reactivate, was
  // answered as that first suspend, and the account stayed ACTIVE.
  function dropKeptKeys() {
    for (const form of detailPane.querySelectorAll("form[data-action]")) {
      delete form.dataset.idempotencyKey;
      delete form.dataset.keyFor;
    }
  }

  for (const form of detailPane.querySelectorAll("form[data-action]")) {
    const action = ACTIONS[form.dataset.action];
    // The same key while the same action is retried on the same entity with the same
    // values after an uncertain answer: the entity applies it once. Anything else is
    // another command.
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!detail) return;
      const key = detail.key;
      const values = new FormData(form);
      if (!window.confirm(action.confirm(key, values))) return;
      const sent = JSON.stringify([detailPane.dataset.kind, key, [...values.entries()]]);
      if (form.dataset.keyFor !== sent) {
        form.dataset.idempotencyKey = newKey();
        form.dataset.keyFor = sent;
      }
      const buttons = form.querySelectorAll("button");
      buttons.forEach((b) => (b.disabled = true));
      try {
        await graphql(action.mutation, {
          key,
          idem: form.dataset.idempotencyKey,
          ...action.variables(values),
        });
        dropKeptKeys();
        form.reset();
        say(`${KINDS[detailPane.dataset.kind].noun} ${key} ${action.done}.`);
        // The list on screen shows the change too (its row, its counts), where it kept the
        // state from before until it was applied again. The checkouts needing an operator
        // come from Temporal's visibility, which follows a moment later: read again as well.
        for (const listing of Object.values(listings)) {
          if (!listing.pane.hidden) listing.load();
        }
        if (!operatorPane.hidden) {
          // The page shown then: one paged away from meanwhile is not brought back.
          const shownThen = operatorCursors;
          for (const after of [0, 1000, 3000]) {
            setTimeout(() => {
              if (!operatorPane.hidden && operatorCursors === shownThen && signedIn()) {
                loadNeedingOperator(shownThen);
              }
            }, after);
          }
        }
      } catch (err) {
        // Refused for good, it is answered so under its key ever after: sent again once its
        // cause is fixed (a balance brought to zero before a close), it needs a new one.
        // Only an answer that may not have come (UNAVAILABLE) keeps it, to apply it once.
        if (!uncertain(err)) {
          delete form.dataset.idempotencyKey;
          delete form.dataset.keyFor;
        }
        say(`${form.dataset.action} ${key} failed: ${failure(err)}`, true);
      } finally {
        buttons.forEach((b) => (b.disabled = false));
        refresh();
      }
    });
  }

  // ---------------------------------------------------------------- wiring

  document.getElementById("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn(document.getElementById("token").value.trim());
  });
  document.getElementById("sign-out").addEventListener("click", () => signOut());
  for (const button of document.querySelectorAll("#tabs [data-tab]")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  detailPane.querySelector("[data-close]").addEventListener("click", closeDetail);
  document.getElementById("find-checkout").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = new FormData(event.target).get("id").trim();
    if (id) openDetail("checkout", id);
  });
  document.getElementById("find-bulk").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = new FormData(event.target).get("id").trim();
    if (id) followBulk(id);
  });

  if (signedIn()) signIn(sessionStorage.getItem(TOKEN_KEY));
})();
