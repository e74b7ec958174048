"""moto's S3 server on 127.0.0.1, as ``python -m moto.server`` runs it, with
one reply corrected: moto names the root element of CompleteMultipartUpload's
answer ``CompleteMultipartUploadResponse`` where S3 says
``CompleteMultipartUploadResult``, and pyarrow's S3 filesystem (which writes
every file as a multipart upload) takes any other root for an error and
retries until it fails.

    python tests/s3_endpoint.py PORT
"""
from __future__ import annotations

import os
import sys


def corrected(app):
    def wsgi(environ, start_response):
        if environ.get("REQUEST_METHOD") != "POST" or "uploadId=" not in environ.get("QUERY_STRING", ""):
            return app(environ, start_response)
        answer: dict = {}

        def keep(status, headers, exc_info=None):
            answer.update(status=status, headers=headers)

        body = b"".join(app(environ, keep)).replace(b"CompleteMultipartUploadResponse",
                                                     b"CompleteMultipartUploadResult")
        headers = [(k, v) for k, v in answer["headers"] if k.lower() != "content-length"]
        start_response(answer["status"], headers + [("Content-Length", str(len(body)))])
        return [body]

    return wsgi


def main() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    port = int(sys.argv[1])
    os.environ.setdefault("MOTO_PORT", str(port))
    run_simple("127.0.0.1", port, corrected(DomainDispatcherApplication(create_backend_app)), threaded=True)


if __name__ == "__main__":
    main()
