// Shows every <time class="ts" datetime="ISO UTC"> in the browser's time zone (Intl API);
// the UTC time stays in the title (hover) and in the datetime attribute. Runs on load and
// after each HTMX swap. Without JavaScript the UTC text remains.
(function () {
  "use strict";
  var format = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
    second: "2-digit", hour12: false, timeZoneName: "short"
  });
  function localise(root) {
    var nodes = (root || document).querySelectorAll("time.ts[datetime]:not([data-local])");
    for (var i = 0; i < nodes.length; i++) {
      var when = new Date(nodes[i].getAttribute("datetime"));
      if (isNaN(when.getTime())) continue;
      nodes[i].textContent = format.format(when);
      nodes[i].setAttribute("data-local", "1");
    }
    var zone = (root || document).querySelectorAll(".tz-name");
    for (var j = 0; j < zone.length; j++) {
      zone[j].textContent = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
    }
  }
  document.addEventListener("DOMContentLoaded", function () { localise(document); });
  document.addEventListener("htmx:afterSettle", function (e) { localise(e.target); });
})();
