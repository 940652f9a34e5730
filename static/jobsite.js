// Small comforts around htmx swaps; the pages work without this file.
(function () {
  "use strict";
  let openDetails = [];
  let logAtBottom = true;

  document.addEventListener("htmx:beforeSwap", function () {
    // a polled list keeps the rows a reader opened
    openDetails = Array.from(document.querySelectorAll("details[id][open]"), (d) => d.id);
    const log = document.getElementById("log");
    logAtBottom = !log || log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  });

  document.addEventListener("htmx:afterSwap", function () {
    for (const id of openDetails) {
      const details = document.getElementById(id);
      if (details) details.open = true;
    }
    // a followed log stays at its end, unless the reader scrolled up to read
    const log = document.getElementById("log");
    if (log && logAtBottom) log.scrollTop = log.scrollHeight;
  });

  // A busy site answers 503 with Retry-After. Polls then wait that long, twice as long
  // each time it happens again (up to a minute), and poll as before once it answers.
  let resumeAt = 0;
  let busyTimes = 0;

  function isPoll(elt) {
    return /\bevery\b/.test(elt.getAttribute("hx-trigger") || "");
  }

  document.addEventListener("htmx:beforeRequest", function (evt) {
    if (isPoll(evt.detail.elt) && Date.now() < resumeAt) evt.preventDefault();
  });

  document.addEventListener("htmx:afterRequest", function (evt) {
    const xhr = evt.detail.xhr;
    if (!isPoll(evt.detail.elt) || !xhr || xhr.status === 0) return;
    if (xhr.status === 503) {
      const retryAfter = Number(xhr.getResponseHeader("Retry-After")) || 2;
      busyTimes += 1;
      resumeAt = Date.now() + Math.min(60, retryAfter * 2 ** (busyTimes - 1)) * 1000;
    } else if (xhr.status < 500) {
      busyTimes = 0;
      resumeAt = 0;
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    const log = document.getElementById("log");
    if (log && log.hasAttribute("hx-get")) log.scrollTop = log.scrollHeight;
  });
})();
