// Keeps the dashboard current without reloading it: every few seconds it
// fetches the dashboard page itself (same origin, with the same session
// cookie as any page load, so no data route of its own exists) and swaps
// in the part that changes (#live). The parsed page is inert: DOMParser
// runs no script, and every value in it was escaped by the server.
(function () {
  'use strict';
  var live = document.getElementById('live');
  if (!live || !window.fetch || !window.DOMParser) return;
  var every = Math.max(2, Number(live.getAttribute('data-refresh-secs')) || 10) * 1000;
  var status = document.getElementById('live-status');
  var busy = false;
  var timer = null;

  function say(text) {
    if (status && status.textContent !== text) status.textContent = text;
  }

  function update() {
    if (busy || document.hidden) return;
    // Replacing the region would drop the keyboard focus: wait until the
    // user has moved on.
    var focused = document.activeElement;
    if (focused && focused !== live && live.contains(focused)) return;
    busy = true;
    fetch('/', {
      credentials: 'same-origin',
      cache: 'no-store',
      headers: { Accept: 'text/html' }
    })
      .then(function (r) {
        if (r.status === 401) {
          clearInterval(timer);
          say('Live updates stopped: the login has ended. Open a new login link to continue.');
          return null;
        }
        if (!r.ok) {
          say('Live updates paused: the daemon answered ' + r.status + '.');
          return null;
        }
        return r.text();
      })
      .then(function (text) {
        if (text === null) return;
        var doc = new DOMParser().parseFromString(text, 'text/html');
        var fresh = doc.getElementById('live');
        if (!fresh) return;
        // A copy first: moving nodes empties the live NodeList.
        live.replaceChildren.apply(live, Array.from(fresh.childNodes));
        live.setAttribute('data-updates', String(Number(live.getAttribute('data-updates') || 0) + 1));
        say('');
      })
      .catch(function () {
        say('Live updates paused: the daemon cannot be reached.');
      })
      .then(function () {
        busy = false;
      });
  }

  timer = setInterval(update, every);
  document.addEventListener('visibilitychange', function () {
    if (!document.hidden) update();
  });
})();
