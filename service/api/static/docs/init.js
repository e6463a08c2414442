// Swagger UI for this server's own schema. A separate file, not an inline script: the page
// runs under the dashboard's Content-Security-Policy (scripts from this server only).
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
