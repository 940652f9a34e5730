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

  document.addEventListener("DOMContentLoaded", function () {
    const log = document.getElementById("log");
    if (log && log.hasAttribute("hx-get")) log.scrollTop = log.scrollHeight;
  });
})();
