// The recording player: asciinema-player on the session's asciicast v2 file.
(function () {
  "use strict";
  var el = document.getElementById("player");
  window.edgePlayer = AsciinemaPlayer.create(el.dataset.cast, el, { fit: "width", idleTimeLimit: 2 });
})();
