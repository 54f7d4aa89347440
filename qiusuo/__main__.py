import sys

from qiusuo.cli import main

sys.exit(main())
